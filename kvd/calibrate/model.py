"""Loading a transformers causal LM from a local directory for calibration and measurement.

The profiler, the refinement, the fidelity harness, tests and benchmarks load models through here
(the one package that loads models for kvd itself, ARCHITECTURE.md). Nothing downloads: the hub is
set offline unless the caller has said otherwise. Getting a model dir for tests (converting the
SmolLM2 GGUF) is ``kvd.testing.models``'s job, not this module's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def load_causal_lm(model_dir: str | Path, *, dtype: str = "float32") -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a local dir, eval mode, offline. fp32 by default: on the CPU it
    is about 4x faster than bf16 and it is the precision fidelity is measured in."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
    model.eval()
    return model, tok


__all__ = ["load_causal_lm"]
