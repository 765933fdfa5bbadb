"""The KL probe: how much the output distribution suffers under a head map, and what each change would buy.

Both head-map searches use it: the profiler's KL-greedy selection (``kvd.calibrate.profiler``) and the
recall refinement (``kvd.calibrate.refine``). A search state is a **choice**: ``[layer][kv_head] ->``
index into ``options``, a tuple of windows in tokens where 0 means global (the convention of
``HeadMap.windows``); every local option shares one ``sink``. ``choice_map`` turns a choice into the
``HeadMap`` it stands for, and the probe runs the model under that map.

``KlProbe.step(choice)`` runs each calibration sequence once forward, measuring ``KL(p_full ‖ p_map)``
(nats, on the sequence's scored positions), and once backward, and linearizes: for head ``h`` and
option ``k`` the KL change is ``Σ_t ⟨∂KL/∂o_h(t), o_h^k(t) − o_h(t)⟩``, where ``o_h`` is the head's
attention output (all its query heads). The probe attention (``"kvd_kl_probe"``) computes the
output under the choice, the outputs under every option, and adds a zero tensor whose gradient is
``∂KL/∂o``. Attention runs through ``structured_sdpa`` (each head pays only for what it sees) and each
decoder layer is checkpointed (recomputed in backward), which together let a CPU profile at 8K
tokens: measured on SmolLM2 at 8K, plain masked attention with stored activations needed > 15 GB.

Lifecycle: a ``KlProbe`` owns the reference (full-attention) distributions of its sequences, computed
once at construction; each ``step`` switches the model's attention implementation through
``kvd.connectors.hf.attention_switch`` and restores it on exit, with the per-layer state
(``module.kvd_kl``) living only inside the step.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvd.calibrate.masked_attention import structured_sdpa
from kvd.connectors.hf.attention_switch import attention_implementation
from kvd.core.headmap import HeadMap

KL_NAME = "kvd_kl_probe"


@dataclass(slots=True, frozen=True)
class CalibSeq:
    name: str
    ids: torch.Tensor  # [1, T]
    positions: torch.Tensor  # [n] positions whose next-token distribution is scored


def choice_map(model: str, choice: Sequence[Sequence[int]], sink: int, options: Sequence[int],
               **extra: Any) -> HeadMap:
    """The head map of ``choice`` (option index per head; ``options[i]`` a window, 0 = global)."""
    is_global = [[options[c] == 0 for c in row] for row in choice]
    window = [[options[c] for c in row] for row in choice]  # a global head's entry is not used
    return HeadMap.from_classes(model, is_global, sink=sink, window=window, **extra)


def option_costs(sink: int, options: Sequence[int], tokens: int) -> list[float]:
    """KV kept by each option at ``tokens`` context, as a fraction of a global head's."""
    return [1.0 if w == 0 else min(tokens, sink + w) / tokens for w in options]


@dataclass(slots=True)
class _KlState:
    sink: tuple[int, ...]  # this layer's choice, per KV head (HeadMap.sinks[layer])
    window: tuple[int, ...]  # HeadMap.windows[layer]
    option_sink: int
    options: tuple[int, ...]
    checkpointed: bool = False  # the layer's forward runs again in backward (``_checkpointed``)
    probe: torch.Tensor | None = None  # zero tensor added to the output; its grad is ∂KL/∂o
    deltas: torch.Tensor | None = None  # [n_opt, q, Hq, D]: o^option - o, alive until the probe's grad
    per_q: torch.Tensor | None = None  # [n_opt, Hq]: -Σ_t ⟨∂KL/∂o, o^option - o⟩


def _gain(st: _KlState, grad: torch.Tensor) -> None:
    """The probe's gradient hook: the linear gains of every option, then the deltas are let go."""
    if st.deltas is None:
        raise RuntimeError("KL probe: the option deltas were not computed before the gradient reached the layer")
    st.per_q = -(st.deltas * grad[0][None]).sum(dim=(1, 3))
    st.deltas = None


def _kl_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    st: _KlState = module.kvd_kl
    out = structured_sdpa(query, key, value, st.sink, st.window, scaling=scaling)
    first = st.probe is None
    if first:
        st.probe = torch.zeros_like(out, requires_grad=True)
        st.probe.register_hook(functools.partial(_gain, st))
    # The deltas are computed in the pass right before backward reaches this layer: the forward, or
    # with checkpointing its recompute, so that only one layer's deltas are alive at a time (at 8K:
    # 94 MB a layer, 2.8 GB for all 30).
    if not (first and st.checkpointed):
        nkv = key.shape[1]
        with torch.no_grad():
            st.deltas = torch.stack([
                structured_sdpa(query, key, value, (st.option_sink if w else 0,) * nkv, (w,) * nkv,
                                scaling=scaling)[0] - out[0].detach()
                for w in st.options])
    return out + st.probe, None


@contextlib.contextmanager
def _checkpointed(layers) -> Iterator[None]:
    """Each decoder layer recomputes its forward during backward instead of keeping its activations:
    at 8K tokens SmolLM2's activations alone take ~12 GB, more than a shared CPU machine has; this
    keeps one layer's at a time, for one more forward of the layer (``_kl_attention`` computes the
    option deltas, the costly part, in the recompute only)."""
    from torch.utils.checkpoint import checkpoint

    for layer in layers:
        layer.forward = functools.partial(checkpoint, type(layer).forward.__get__(layer), use_reentrant=False)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


class KlProbe:
    """Runs calibration sequences under a choice of head options (see the module docstring)."""

    def __init__(self, model, seqs: list[CalibSeq], sink: int, options: Sequence[int], *, checkpoint: bool = True):
        self.model, self.seqs = model, seqs
        self.sink, self.options = sink, tuple(options)
        self.checkpoint = checkpoint
        self.ref = []
        with torch.no_grad():
            for s in seqs:
                h = model.model(input_ids=s.ids.to(model.device), use_cache=False).last_hidden_state
                self.ref.append(torch.log_softmax(model.lm_head(h[0, s.positions]).float(), -1))

    def step(self, choice: list[list[int]]) -> tuple[list[float], torch.Tensor]:
        """Measured KL per sequence and linear gains ``[L, Hkv, n_opt]`` (KL drop if upgraded)."""
        model = self.model
        nkv = model.config.num_key_value_heads
        hm = choice_map("kl-probe", choice, self.sink, self.options)
        kls = []
        with attention_implementation(model, KL_NAME, _kl_attention, layer_attr="kvd_kl") as mods, \
                _checkpointed(model.model.layers if self.checkpoint else []):
            gains = torch.zeros(len(mods), nkv, len(self.options), dtype=torch.float64)
            for s, ref in zip(self.seqs, self.ref, strict=True):
                for layer, mod in enumerate(mods):
                    mod.kvd_kl = _KlState(hm.sinks[layer], hm.windows[layer], self.sink, self.options,
                                          checkpointed=self.checkpoint)
                h = model.model(input_ids=s.ids.to(model.device), use_cache=False).last_hidden_state
                logq = torch.log_softmax(model.lm_head(h[0, s.positions]).float(), -1)
                kl = (ref.exp() * (ref - logq)).sum(-1).mean()
                kl.backward()
                kls.append(float(kl.detach()))
                for layer, mod in enumerate(mods):
                    per_q = mod.kvd_kl.per_q  # [n_opt, Hq], from the probe's gradient hook
                    gains[layer] += per_q.view(len(self.options), nkv, -1).sum(-1).T.double().cpu()
                    mod.kvd_kl = None
        return kls, gains


__all__ = ["KL_NAME", "CalibSeq", "KlProbe", "choice_map", "option_costs"]
