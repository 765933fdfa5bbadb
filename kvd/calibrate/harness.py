"""Fidelity harness: a head map against the same model with full KV, on generated tasks.

Tasks (``kvd.calibrate.tasks``; evaluation seeds ≥ 1000, disjoint from calibration):

- ``passkey`` and ``multikey`` at a given token length: the prompt is followed by the true answer
  and run once teacher-forced. The prompt counts as solved when the greedy argmax at every answer
  position is the answer token — exactly the condition for greedy decoding to produce the answer,
  for one forward instead of one per token. Accuracy is reported for full KV and for the map.
- ``natural`` text (even prompts: project docs; odd: generated prose) of the given length: the
  next-token distributions on the last ``kl_positions`` positions are compared.

Metrics per prompt, against full KV: ``kl`` = mean ``KL(p_full ‖ p_map)`` in nats over the scored
positions; ``top1`` = share of scored positions with the same argmax; task ``correct``; and, when
``gen_tokens > 0``, greedy generation of ``gen_tokens`` tokens after the prompt: ``greedy_match``
(share of the full-KV tokens reproduced position by position) and ``length_ratio`` (generated length
with the map over without; generation stops at end-of-sequence). ``kv_fraction``/``kv_bytes``: KV the
map holds for the prompt (bf16, as served) over/of full KV.

Full-KV references are cached on disk per prompt and model (``cache_dir``), so a map sweep pays for the full
forward once. Everything runs in the model's dtype (fp32 on the CPU).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kvd.calibrate import tasks
from kvd.calibrate.masked_attention import apply_head_map
from kvd.core.headmap import HeadMap

TASKS = ("passkey", "multikey", "natural")


@dataclass(slots=True, frozen=True)
class Prompt:
    task: str
    length: int
    seed: int
    ids: tuple[int, ...]
    scored: tuple[int, ...]  # positions whose next-token distribution is compared
    answer_at: tuple[int, ...] = ()  # recall: positions of the answer tokens (targets)

    @property
    def key(self) -> str:
        h = hashlib.blake2b(repr((self.task, self.length, self.seed, self.ids, self.scored)).encode(),
                            digest_size=8).hexdigest()
        return f"{self.task}-{self.length}-{self.seed}-{h}"


@dataclass(slots=True, frozen=True)
class PromptResult:
    task: str
    length: int
    seed: int
    kl: float
    top1: float
    num_scored: int
    correct: bool | None
    correct_full: bool | None
    greedy_match: float | None
    length_ratio: float | None
    kv_fraction: float
    kv_bytes: int
    kv_bytes_full: int


def make_prompts(tok, task: str, length: int, num: int, *, kl_positions: int = 1024,
                 seed_base: int = tasks.EVAL_SEED_BASE, passkey_variant: str = "repeat") -> list[Prompt]:
    """``num`` evaluation prompts of ``task`` at about ``length`` tokens (seeds ``seed_base + i``).

    ``passkey_variant``: ``repeat``/``prose`` filler, optionally ``-chat`` (see ``tasks.passkey``).
    """
    out = []
    for i in range(num):
        seed = seed_base + i
        if task in ("passkey", "multikey"):
            if task == "passkey":
                filler, _, chat = passkey_variant.partition("-")
                rec = tasks.passkey(tok, seed, length, filler=filler, chat=chat == "chat")
            else:
                rec = tasks.multikey(tok, seed, length)
            p_ids = tok(rec.prompt)["input_ids"]
            a_ids = tok(rec.answer)["input_ids"]
            ids = p_ids + a_ids
            at = tuple(range(len(p_ids), len(ids)))
            out.append(Prompt(task, length, seed, tuple(ids), tuple(a - 1 for a in at), at))
        elif task == "natural":
            ids = tasks.natural_text_ids(tok, "docs" if i % 2 == 0 else "prose", seed, length)
            k = min(kl_positions, length - 1)
            out.append(Prompt(task, length, seed, tuple(ids), tuple(range(length - k, length))))
        else:
            raise ValueError(f"unknown task {task!r}; use one of {TASKS}")
    return out


def _kv_bytes(head_map: HeadMap | None, model, num_tokens: int) -> tuple[int, int]:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token_head = 2 * head_dim * 2  # K and V, bf16 as served
    full = cfg.num_hidden_layers * cfg.num_key_value_heads * num_tokens * per_token_head
    if head_map is None:
        return full, full
    kept = sum(s.kept_tokens(num_tokens) for row in head_map.heads for s in row)
    return kept * per_token_head, full


@torch.no_grad()
def _model_key(model) -> str:
    """``-m<hash>`` of the model's config, dtype and weights: a cached reference belongs to one model
    (two models sharing a tokenizer give the same prompt ids)."""
    h = hashlib.blake2b(model.config.to_json_string().encode(), digest_size=8)
    for name, p in model.named_parameters():
        h.update(f"{name}{p.dtype}{tuple(p.shape)}{float(p.sum(dtype=torch.float64))!r}".encode())
    return f"-m{h.hexdigest()}"


class Harness:
    """Evaluates maps on prompts; owns the model, tokenizer and the reference cache."""

    def __init__(self, model, tok, *, cache_dir: Path | None = None, gen_tokens: int = 0):
        self.model, self.tok, self.gen_tokens = model, tok, gen_tokens
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._mem: dict[str, dict] = {}
        self._model_key = _model_key(model) if self.cache_dir else ""

    # ---- forwards ----------------------------------------------------------------------------

    @torch.no_grad()
    def _run(self, prompt: Prompt, head_map: HeadMap | None, gen_tokens: int) -> dict:
        """Log-probs at the scored positions and (optionally) a greedy continuation."""
        ids = torch.tensor([prompt.ids], device=self.model.device)
        model = self.model

        def go():
            out = model.model(input_ids=ids, use_cache=gen_tokens > 0)
            h = out.last_hidden_state[0, list(prompt.scored)]
            logp = torch.log_softmax(model.lm_head(h).float(), -1).cpu()
            gen = self._greedy(out.past_key_values, out.last_hidden_state[:, -1:], gen_tokens) if gen_tokens else []
            return {"logp": logp, "gen": gen}

        if head_map is None:
            return go()
        with apply_head_map(model, head_map):
            return go()

    def _greedy(self, cache, last_hidden, n: int) -> list[int]:
        model, eos = self.model, self.model.config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        tok_id = int(model.lm_head(last_hidden[0, -1]).argmax())
        out = [tok_id]
        for _ in range(n - 1):
            if tok_id in eos_ids:
                break
            o = model.model(input_ids=torch.tensor([[tok_id]], device=model.device), past_key_values=cache,
                            use_cache=True)
            cache = o.past_key_values
            tok_id = int(model.lm_head(o.last_hidden_state[0, -1]).argmax())
            out.append(tok_id)
        return out

    def reference(self, prompt: Prompt) -> dict:
        """Full-KV log-probs (and greedy tokens), from memory, disk, or one forward."""
        key = f"{prompt.key}-g{self.gen_tokens}{self._model_key}"
        if key in self._mem:
            return self._mem[key]
        path = self.cache_dir / f"{key}.pt" if self.cache_dir else None
        if path is not None and path.is_file():
            ref = torch.load(path)
        else:
            ref = self._run(prompt, None, self.gen_tokens)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                torch.save(ref, tmp)
                tmp.replace(path)
        self._mem = {key: ref}  # keep one: natural-text references are ~200 MB each
        return ref

    # ---- metrics -----------------------------------------------------------------------------

    def evaluate(self, prompt: Prompt, head_map: HeadMap | None, *, gen_tokens: int | None = None
                 ) -> PromptResult:
        """Compare ``head_map`` (None: full KV) with full KV on one prompt."""
        n_gen = self.gen_tokens if gen_tokens is None else min(gen_tokens, self.gen_tokens)
        ref = self.reference(prompt)
        run = self._run(prompt, head_map, n_gen)
        lp, lq = ref["logp"], run["logp"]
        kl = (lp.exp() * (lp - lq)).sum(-1)
        top1 = (lp.argmax(-1) == lq.argmax(-1)).float()
        correct = correct_full = None
        if prompt.answer_at:
            target = torch.tensor([prompt.ids[a] for a in prompt.answer_at])
            correct = bool((lq.argmax(-1) == target).all())
            correct_full = bool((lp.argmax(-1) == target).all())
        match = ratio = None
        if n_gen:
            g_ref, g = ref["gen"][:n_gen], run["gen"]
            match = sum(a == b for a, b in zip(g_ref, g, strict=False)) / max(1, len(g_ref))
            ratio = len(g) / max(1, len(g_ref))
        kept, full = _kv_bytes(head_map, self.model, len(prompt.ids))
        return PromptResult(prompt.task, prompt.length, prompt.seed, float(kl.mean()), float(top1.mean()),
                            len(prompt.scored), correct, correct_full, match, ratio, kept / full, kept, full)


def summarize(results: list[PromptResult]) -> dict[str, dict]:
    """Aggregate per ``task@length``: means over prompts (all prompts of a group score equally many
    positions except recall prompts, whose answers are all 5-6 tokens)."""
    groups: dict[str, list[PromptResult]] = {}
    for r in results:
        groups.setdefault(f"{r.task}@{r.length}", []).append(r)
    out = {}
    for name, rs in sorted(groups.items()):
        n = len(rs)
        row = {"prompts": n,
               "mean_kl": sum(r.kl for r in rs) / n,
               "top1_agreement": sum(r.top1 * r.num_scored for r in rs) / sum(r.num_scored for r in rs),
               "kv_fraction": sum(r.kv_fraction for r in rs) / n,
               "kv_bytes": sum(r.kv_bytes for r in rs) / n,
               "kv_bytes_full": sum(r.kv_bytes_full for r in rs) / n}
        if rs[0].correct is not None:
            row["acc"] = sum(bool(r.correct) for r in rs) / n
            row["acc_full"] = sum(bool(r.correct_full) for r in rs) / n
        if rs[0].greedy_match is not None:
            row["greedy_match"] = sum(r.greedy_match for r in rs) / n
            row["length_ratio"] = sum(r.length_ratio for r in rs) / n
        out[name] = row
    return out


def result_dict(r: PromptResult) -> dict:
    return asdict(r)
