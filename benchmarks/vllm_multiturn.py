"""A conversation's second turn in a fresh vLLM engine (CPU build, SmolLM2-135M-Instruct): kvd with the
answer's chunks stored by decode steps (``save_decode``, the connector's default) against kvd storing
prompt chunks only (``save_decode: false``, what LMCache stores by default: its ``save_decode_cache``
is off), and against recomputing the whole turn.

    nice python benchmarks/vllm_multiturn.py [--rounds 5] [--prompt 1024] [--answer 768]

Results: benchmarks/results/vllm_multiturn.json and .png.

**Setup.** One kvd daemon (host arena 2 GiB, SSD tier on, as ``vllm_e2e.py``). Every engine runs the
same pinned thread settings (``vllm_e2e_procs.THREAD_ENV``: one OpenMP thread on core 0) and the same
kvd connector; they differ only in ``save_decode``.

1. Engine ``store_decode`` (``save_decode: true``) and then engine ``store_prompt`` (``false``) each
   serve turn 1 of every conversation: a fact prompt (``vllm_e2e.fact_prompt``: a pass key at 10-50 %
   depth, asked at the end) of ``--prompt`` tokens, answered with ``--answer`` generated tokens (EOS
   ignored, greedy), under vLLM's cache salt ``decode`` or ``prompt`` (the salt is part of kvd's
   namespace and of vLLM's own prefix-cache keys, so the two stores never meet). Both exit.
2. Turn 2 of each conversation: turn 1, the answer its storing engine gave, and the question again
   (``vllm_e2e.QUESTION``). A fresh engine ``reader`` (save_decode on, irrelevant to loads) serves
   each turn 2 under the storing engine's salt (``kvd_decode_saved``, ``kvd_prompt_only``) and under
   a salt never used (``recompute``: nothing stored, nothing in vLLM's own cache; same tokens, same
   engine). **Gate first**, on the first two conversations: the loaded modes must answer as the
   recompute of the same tokens (the first ``CHECK_TOKENS`` tokens equal, the first logprob within
   ``LOGPROB_TOL``) and load exactly the tokens their stores allow: ``kvd_decode_saved`` the full
   chunks of prompt + answer whose KV exists (the answer's last token was sampled, never fed back),
   ``kvd_prompt_only`` the prompt's full chunks and its tail entry. Then ``--rounds`` conversations,
   modes in shuffled order per round, 1.5 s apart: TTFT = wall time of one ``generate`` with
   ``max_tokens=1``; each timed first token checked against the gate's rule too.

3. The peer, LMCache 0.5.6 in its multiprocess mode (``make lmcache-venv``; the same server options as
   ``vllm_e2e.py``, 2 GB L1), at its defaults: engine ``store_lmcache`` answers turn 1 of every
   conversation through ``LMCacheMPConnector``, then a fresh ``reader_lmcache`` serves turn 2 (its
   own answer's tokens). Gate: its answers equal the recompute of the same tokens (computed by
   ``reader`` under an unused salt) and it loaded some tokens (a miss would time a recompute); how many
   it loads is reported, whatever it is. Timed in
   its own phase after the kvd reader's (one engine at a time on the pinned core), same rounds.

That loading KV computed by other weights or tokens fails this gate is shown by ``vllm_e2e.py
--self-check`` (same connector and probe); this benchmark adds what decode steps store.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.vllm_e2e import KVD_CONNECTOR, LOGPROB_TOL, PAUSE_S, QUESTION, fact_prompt, machine, spread  # noqa: E402
from benchmarks.vllm_e2e_procs import (  # noqa: E402
    LMCACHE_PYTHON,
    THREAD_ENV,
    Engine,
    KvdDaemon,
    LMCacheServer,
    load_avg,
    start_lmcache,
)

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
CHUNK = 256
MODES = ("kvd_decode_saved", "kvd_prompt_only", "recompute")
GATE = 2  # conversations used by the gate only (never timed)


def expected_cached(mode: str, prompt: int, answer: int, block: int = 128) -> int:
    """Tokens a turn-2 load may take. decode saved: the full chunks of prompt + answer whose KV exists
    (the last answer token was never fed back); prompt only: the prompt's full chunks and its tail
    entry (block-aligned, before the last prompt token)."""
    if mode == "kvd_decode_saved":
        return (prompt + answer - 1) // CHUNK * CHUNK
    if mode == "kvd_prompt_only":
        full = prompt // CHUNK * CHUNK
        return full + max(0, (prompt - 1 - full) // block * block)
    return 0


def same_answer(got: dict, ref: dict, n: int | None = None) -> bool:
    ids = got["token_ids"] if n is None else got["token_ids"][:n]
    return ids == ref["token_ids"][: len(ids)] and abs(got["logprobs"][0] - ref["logprobs"][0]) < LOGPROB_TOL


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=1024, help="turn-1 prompt tokens")
    ap.add_argument("--answer", type=int, default=768, help="turn-1 answer tokens (generated)")
    ap.add_argument("--out", type=Path, default=RESULTS / "vllm_multiturn.json")
    ap.add_argument("--no-lmcache", action="store_true", help="leave out the LMCache peer")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from kvd.testing.models import smollm2_dir

    model_dir = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    n = GATE + args.rounds
    turn1 = {f"C{i}": fact_prompt(tok, 7000 + i, args.prompt)[0] for i in range(n)}
    question = tok.encode(QUESTION, add_special_tokens=False)
    res: dict = {"date": date.today().isoformat(), "machine": machine(), "model": "SmolLM2-135M-Instruct (bf16)",
                 "prompt_tokens": args.prompt, "answer_tokens": args.answer, "rounds": args.rounds,
                 "chunk_tokens": CHUNK, "thread_settings": dict(THREAD_ENV), "load_avg": {}}
    with tempfile.TemporaryDirectory(prefix="kvd-multiturn-") as tmp:
        root = Path(tmp)
        kvd = KvdDaemon(root / "kvd", "2GiB").start()
        lmc = start_lmcache(root, res, not args.no_lmcache)

        def connector(save_decode: bool) -> dict:
            return {**KVD_CONNECTOR, "kv_connector_extra_config": {"socket": kvd.socket, "namespace": "multiturn",
                                                                   "save_decode": save_decode}}

        answers: dict[str, dict[str, list[int]]] = {}
        bindings = {}
        try:
            for salt, save_decode in (("decode", True), ("prompt", False)):
                eng = Engine(f"store_{salt}", root, model_dir, turn1, connector=connector(save_decode))
                eng.wait_ready()
                t0 = time.monotonic()
                answers[salt] = {c: eng.ask("answer", c, max_tokens=args.answer, salt=salt)["token_ids"] for c in turn1}
                res[f"store_{salt}_s"] = round(time.monotonic() - t0, 1)
                bindings[eng.name] = eng.thread_binding()
                eng.close()
            if lmc is not None:
                eng = Engine("store_lmcache", root, model_dir, turn1, connector=lmc.connector(), python=str(LMCACHE_PYTHON))
                eng.wait_ready()
                t0 = time.monotonic()
                answers["lmcache"] = {c: eng.ask("answer", c, max_tokens=args.answer, salt="lmcache")["token_ids"]
                                      for c in turn1}
                res["store_lmcache_s"] = round(time.monotonic() - t0, 1)
                bindings[eng.name] = eng.thread_binding()
                eng.close()
            res["answers_equal"] = answers["decode"] == answers["prompt"]
            res["load_avg"]["after_stores"] = load_avg()
            # turn 2 per mode: its storing engine's answer (recompute: the decode store's tokens)
            src = {"kvd_decode_saved": "decode", "kvd_prompt_only": "prompt", "recompute": "decode"}
            turn2 = {f"{m}:{c}": turn1[c] + answers[src[m]][c] + question for m in MODES for c in turn1}
            turn2.update({f"ref_prompt:{c}": turn1[c] + answers["prompt"][c] + question for c in turn1})
            if lmc is not None:
                turn2.update({f"lmcache:{c}": turn1[c] + answers["lmcache"][c] + question for c in turn1})
            reader = Engine("reader", root, model_dir, turn2, connector=connector(True))
            reader.wait_ready()
            bindings["reader"] = reader.thread_binding()
            fresh = iter(range(10**6))

            def ask(mode: str, c: str, op: str) -> dict:
                salt = {"kvd_decode_saved": "decode", "kvd_prompt_only": "prompt"}.get(mode, f"fresh-{next(fresh)}")
                name = {"ref_prompt": f"ref_prompt:{c}", "ref_lmcache": f"lmcache:{c}"}.get(mode, f"{mode}:{c}")
                return reader.ask(op, name, salt=salt)

            gate, ok = {}, True
            for i in range(GATE):
                c = f"C{i}"
                refs = {"decode": ask("recompute", c, "check"), "prompt": ask("ref_prompt", c, "check")}
                for mode, ref in (("kvd_decode_saved", refs["decode"]), ("kvd_prompt_only", refs["prompt"])):
                    got = ask(mode, c, "check")
                    want = expected_cached(mode, args.prompt, args.answer)
                    g = {"answer_equal": same_answer(got, ref), "cached": got["cached"], "cached_expected": want,
                         "first_logprob_gap": abs(got["logprobs"][0] - ref["logprobs"][0])}
                    gate[f"{mode}:{c}"] = g
                    ok &= g["answer_equal"] and got["cached"] == want
            res["gate"], res["gate_passed"] = gate, ok
            print(json.dumps(gate, indent=1), flush=True)
            if not ok:
                print("correctness gate failed: nothing timed", file=sys.stderr)
                return 1
            times: dict[str, list[float]] = {m: [] for m in MODES}
            cached: dict[str, list[int]] = {m: [] for m in MODES}
            first: dict[str, dict] = {}
            wrong = 0
            res["load_avg"]["before_timed"] = load_avg()
            rng = random.Random(0)
            for i in range(GATE, n):
                c = f"C{i}"
                for mode in rng.sample(MODES, len(MODES)):
                    time.sleep(PAUSE_S)
                    a = ask(mode, c, "time")
                    times[mode].append(a["s"])
                    cached[mode].append(a["cached"])
                    first[f"{mode}:{c}"] = a
                # every timed load gave the first token the recompute of the same tokens gave
                ref = first[f"recompute:{c}"]
                wrong += not same_answer(first[f"kvd_decode_saved:{c}"], ref, 1)
            res["load_avg"]["after_timed"] = load_avg()
            lmc_refs = {} if lmc is None else {  # the recompute of LMCache's turn-2 tokens, for its gate
                f"C{i}": ask("ref_lmcache", f"C{i}", "check" if i < GATE else "time") for i in range(n)}
            reader.close()
            if lmc is not None:
                res.update(lmcache_turn2(root, model_dir, turn2, lmc, lmc_refs, GATE, n, bindings))
        finally:
            kvd.stop()
            if lmc is not None:
                lmc.stop()
    res["thread_bindings"] = bindings
    res["thread_settings"]["equal_for_all_engines"] = len(set(bindings.values())) == 1
    res["first_token_mismatches"] = wrong
    for m in MODES:
        res[f"ttft_{m}_s"] = round(statistics.median(times[m]), 4)
        res[f"ttft_spread_{m}_s"] = spread(times[m])
        res[f"ttft_runs_{m}_s"] = [round(x, 4) for x in times[m]]
        res[f"cached_tokens_{m}"] = sorted(set(cached[m]))
    res["turn2_tokens"] = args.prompt + args.answer + len(question)
    res["speedup_decode_saved_vs_prompt_only"] = round(res["ttft_kvd_prompt_only_s"] / res["ttft_kvd_decode_saved_s"], 3)
    res["speedup_decode_saved_vs_recompute"] = round(res["ttft_recompute_s"] / res["ttft_kvd_decode_saved_s"], 3)
    if "ttft_lmcache_s" in res:
        res["speedup_decode_saved_vs_lmcache"] = round(res["ttft_lmcache_s"] / res["ttft_kvd_decode_saved_s"], 3)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    plot(res, args.out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in res.items() if k.startswith(("ttft_", "speedup", "cached"))
                      and "runs" not in k and "spread" not in k}, indent=1))
    return 0


def lmcache_turn2(root: Path, model_dir: Path, turn2: dict, lmc: LMCacheServer, refs: dict, gate_n: int, n: int,
                  bindings: dict) -> dict:
    """Turn 2 in a fresh LMCache engine: the gate on the first ``gate_n`` conversations (answers equal
    the kvd reader's recompute of the same tokens), then one timed request per remaining one."""
    eng = Engine("reader_lmcache", root, model_dir, turn2, connector=lmc.connector(), python=str(LMCACHE_PYTHON))
    eng.wait_ready()
    bindings[eng.name] = eng.thread_binding()
    out: dict = {"lmcache_gate": {}}
    try:
        for i in range(gate_n):
            got = eng.ask("check", f"lmcache:C{i}", salt="lmcache")  # turn 1's salt: LMCache keys by it too
            out["lmcache_gate"][f"C{i}"] = {"answer_equal": same_answer(got, refs[f"C{i}"]), "cached": got["cached"]}
        # a hit, not a recompute: an LMCache engine that loaded nothing answers as the recompute does, and its
        # "TTFT" would be a recompute's (as vllm_e2e's gate, cached > 0)
        out["lmcache_gate_passed"] = all(g["answer_equal"] and g["cached"] > 0 for g in out["lmcache_gate"].values())
        if not out["lmcache_gate_passed"]:
            out["lmcache_blocker"] = "LMCache's turn-2 answers differ from the recompute, or it loaded nothing: not timed"
            return out
        times, cached, wrong = [], [], 0
        for i in range(gate_n, n):
            time.sleep(PAUSE_S)
            a = eng.ask("time", f"lmcache:C{i}", salt="lmcache")
            times.append(a["s"])
            cached.append(a["cached"])
            wrong += not same_answer(a, refs[f"C{i}"], 1)
    finally:
        eng.close()
    out.update({"ttft_lmcache_s": round(statistics.median(times), 4), "ttft_spread_lmcache_s": spread(times),
                "ttft_runs_lmcache_s": [round(x, 4) for x in times], "cached_tokens_lmcache": sorted(set(cached)),
                "lmcache_first_token_mismatches": wrong})
    return out


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    labels = ["kvd, answer stored\n(save_decode)", "kvd, prompt only", "recompute"]
    for i, m in enumerate(MODES):
        ax.scatter([i] * len(res[f"ttft_runs_{m}_s"]), res[f"ttft_runs_{m}_s"], color="#555", s=12, zorder=3)
        ax.bar(i, res[f"ttft_{m}_s"], color=("#3b7dd8", "#9cbde8", "#999")[i])
    if "ttft_lmcache_s" in res:
        k = len(MODES)
        ax.scatter([k] * len(res["ttft_runs_lmcache_s"]), res["ttft_runs_lmcache_s"], color="#555", s=12, zorder=3)
        ax.bar(k, res["ttft_lmcache_s"], color="#d98c3f")
        labels = labels + ["LMCache 0.5.6\n(defaults)"]
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("turn-2 TTFT (s), fresh engine")
    ax.set_title(f"vLLM CPU, SmolLM2-135M: turn 2 = {res['prompt_tokens']} + {res['answer_tokens']} answer "
                 f"+ question ({res['date']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
