"""Switching a transformers model's attention implementation, and restoring it: the one place kvd does it.

transformers looks the attention function up by name on every forward
(``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...)``), so kvd registers a
named function and points the model's config at that name. Every user goes through here: the page-pool
adapter (``"kvd"``, ``kvd.connectors.hf.cache``), the masked reference attention (``"kvd_headmap"``,
``kvd.calibrate.masked_attention``), the score probe (``"kvd_probe"``) and the KL probe
(``"kvd_kl_probe"``) of ``kvd.calibrate``.

A name is registered with both ``AttentionInterface`` and ``AttentionMaskInterface`` (as transformers'
``sdpa_mask``): without the mask registration transformers hands a custom function
``attention_mask=None``, and a second forward over an existing cache silently loses its causal offset
(ENGINES.md §3.3). Registration is a dict entry per name, so registering again is harmless.

Lifecycle: ``attach`` registers and switches, returning the implementation it replaced; ``detach``
switches back to it. ``attention_implementation`` does both around a block, optionally setting one
attribute per decoder layer's attention module (the function's per-layer state, e.g. a head map's
grids) and removing it on exit, also when the block raises.

Why here: this is transformers glue, the hf connector's trade. ``kvd.calibrate`` may depend on
connectors, while ``kvd.core`` must not touch model code (policies import core); the module imports
nothing of kvd, and ``kvd.connectors.hf`` imports its submodules lazily, so calibrate does not pull
in the client by importing it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch


def register(name: str, fn: Callable[..., Any]) -> str:
    """Register ``fn`` as attention ``name`` (with ``sdpa_mask`` as its mask function); return ``name``.

    Idempotent: registering the same name again replaces the entry (the last ``fn`` wins).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def attach(model: torch.nn.Module, name: str, fn: Callable[..., Any]) -> str:
    """Register ``fn`` as ``name`` and switch ``model`` to it; return the implementation it replaced."""
    register(name, fn)
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    return previous


def detach(model: torch.nn.Module, previous: str) -> None:
    """Switch ``model`` back to ``previous`` (what ``attach`` returned)."""
    model.set_attn_implementation(previous)


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention module of each decoder layer, in layer order (Llama family)."""
    layers = model.model.layers if hasattr(model, "model") else model.layers
    return [layer.self_attn for layer in layers]


@contextlib.contextmanager
def attention_implementation(model: torch.nn.Module, name: str, fn: Callable[..., Any], *,
                             layer_attr: str | None = None, layer_values: Sequence[Any] | None = None
                             ) -> Iterator[list[torch.nn.Module]]:
    """Run the block with ``model`` on attention ``fn`` (as ``name``); yield the attention modules.

    With ``layer_attr``, ``layer_values[i]`` (if given) is set as that attribute of layer i's
    attention module on entry, and the attribute is removed from every module on exit (the block may
    also set it). The previous implementation is restored on exit, also on an exception.
    Raises ``ValueError`` if ``layer_values`` does not have one value per layer.
    """
    mods = attention_modules(model)
    if layer_values is not None and (layer_attr is None or len(layer_values) != len(mods)):
        raise ValueError(f"layer_values has {len(layer_values)} entries for attribute {layer_attr!r}, the "
                         f"model has {len(mods)} layers; pass one value per layer and name the attribute")
    previous = attach(model, name, fn)
    try:
        if layer_values is not None:
            for mod, value in zip(mods, layer_values, strict=True):
                setattr(mod, layer_attr, value)
        yield mods
    finally:
        detach(model, previous)
        if layer_attr is not None:
            for mod in mods:
                mod.__dict__.pop(layer_attr, None)


__all__ = ["attach", "attention_implementation", "attention_modules", "detach", "register"]
