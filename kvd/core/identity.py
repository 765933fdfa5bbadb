"""Model identity: the ``model_id`` of a fingerprint, from the weights an engine loads, not its name.

Two engines share KV only when their fingerprints are equal (``kvd.core.keys``), and the fingerprint
starts from ``model_id``. A name cannot carry that weight: vLLM knows the model by the path it was
given, transformers by its config's ``name_or_path``, and two fine-tunes of one architecture share
names and shapes — mixing their KV would be silently wrong KV, the worst failure kvd can have. So
``model_identity(dir)`` names the *content* of the model directory every engine loads:

- ``config.json`` as canonical JSON (sorted keys; minus the keys that only say who wrote the file:
  ``transformers_version``, ``_name_or_path``, ``_commit_hash``): architecture, RoPE, norms, vocabulary;
- the weights engines load: ``*.safetensors`` when there are any (vLLM and transformers both prefer
  them): every tensor in name order — name, dtype, shape and ``SAMPLE_BYTES`` at its start, middle
  and end — so the identity does not depend on file names, sharding or the order tensors are laid
  out in; else ``*.bin``/``*.pt``/``*.pth``/``*.gguf`` files: name, size, the first ``HEAD_BYTES``
  (where pickles and GGUF keep their metadata) and ``SPREAD_SAMPLES`` samples spread over the file.

Why a sample is enough: names, dtypes and shapes pin the layout exactly, and training changes weights
densely — a fine-tune (full, or a merged LoRA) moves nearly every element of every matrix it trains,
so a 4 KiB sample (2,048 bf16 values) of a trained tensor stays equal only if essentially none of
them changed: even if only 1 % of the values changed, all 2,048 would be equal with probability
0.99^2048 ≈ 1e-9, and every tensor has three samples. What samples cannot see is an edit confined to
a few values away from them (new embedding rows alone, a hand-patched block): name such weights with
``model_id`` by hand, or pass ``full=True``, which hashes every byte.

Cost: what is read does not grow with the model's size, only with its tensor count: for an 8B Llama
(16 GB, 291 tensors in 4 shards) 4 headers and 873 reads of at most 4 KiB (3.5 MB); for SmolLM2 (270
MB, 272 tensors, one file) 2.7 MB, measured 0.09 s with the file out of the page cache and 6 ms in
it (``full=True``: 0.4 s here; on an 8B model, 16 GB at the disk's speed). Each process computes it
once per directory (cached by path and the files' inodes, sizes, modification and change times).

``model_id`` is ``<model_type>@<32 hex>`` (``llama@635f…``): equal for the same weights wherever the
directory lives or however it is named, different when any hashed byte differs. A hub name
(``org/name``) is resolved to its snapshot in the local Hugging Face cache (``resolve_model_dir``);
nothing is downloaded. ``choose_model_id`` is the rule every connector applies (an explicit
``model_id`` wins; with no local files, the name, as before).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FORMAT = 1  # bump when what is hashed changes (every identity changes with it)
SAMPLE_BYTES = 4096
HEAD_BYTES = 1 << 20  # non-safetensors files: their header region (pickle / GGUF metadata)
SPREAD_SAMPLES = 64
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on its JSON header
_PREFERRED = (".safetensors",)
_OTHER = (".bin", ".pt", ".pth", ".gguf")


@dataclass(slots=True, frozen=True)
class ModelIdentity:
    model_id: str  # "<model_type>@<32 hex>"
    digest: str  # the 32 hex chars
    files: tuple[str, ...]  # weight files hashed, relative to the directory
    bytes_read: int  # for accounting: what the identity cost in reads


def _weight_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix in _PREFERRED)
    return files or sorted(p for p in root.iterdir() if p.is_file() and p.suffix in _OTHER)


def _sample_ranges(start: int, end: int) -> list[tuple[int, int]]:
    """Start, middle and end of ``[start, end)`` (all of it when it is short)."""
    if end - start <= 3 * SAMPLE_BYTES:
        return [(start, end)]
    mid = start + (end - start - SAMPLE_BYTES) // 2
    return [(start, start + SAMPLE_BYTES), (mid, mid + SAMPLE_BYTES), (end - SAMPLE_BYTES, end)]


def _safetensors_index(path: Path) -> dict[str, tuple[str, list[int], int, int]] | None:
    """``name -> (dtype, shape, start, end)`` (absolute byte offsets) of a safetensors file; None if it
    is not one."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return None
        (n,) = struct.unpack("<Q", head)
        if not 2 <= n <= min(MAX_HEADER_BYTES, path.stat().st_size - 8):
            return None
        try:
            meta = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError):
            return None
    out = {}
    for name, v in meta.items():
        if name != "__metadata__" and isinstance(v, dict) and "data_offsets" in v:
            lo, hi = (int(x) for x in v["data_offsets"])
            out[name] = (str(v.get("dtype")), list(v.get("shape", [])), 8 + n + lo, 8 + n + hi)
    return out


def _read(path: Path, ranges: list[tuple[int, int]], h, base: int = 0) -> int:
    """Hash each range's bytes after its offset (relative to ``base``) and length; returns bytes read."""
    read = 0
    with open(path, "rb") as f:
        for lo, hi in ranges:
            f.seek(lo)
            data = f.read(hi - lo)
            h.update(struct.pack("<QQ", lo - base, len(data)))
            h.update(data)
            read += len(data)
    return read


def _hash_tensors(h, files: list[Path], full: bool) -> int | None:
    """Every tensor of a safetensors model, in name order: name, dtype, shape, sampled bytes (offsets
    relative to the tensor). Independent of file names, sharding and layout order; None if a file is
    not safetensors."""
    # name -> every file's copy of it, in file order: a name in two files (shards beside a leftover
    # single file) is hashed in both, since which one an engine loads is not the directory's to say
    tensors: dict[str, list[tuple[Path, str, list[int], int, int]]] = {}
    for path in files:
        index = _safetensors_index(path)
        if index is None:
            return None
        for name, entry in index.items():
            tensors.setdefault(name, []).append((path, *entry))
    read = 0
    for name in sorted(tensors):
        for path, dtype, shape, lo, hi in tensors[name]:
            h.update(f"tensor\0{name}\0{dtype}\0{shape}\0{hi - lo}\0".encode())
            ranges = [(lo, hi)] if full else _sample_ranges(lo, hi)
            read += _read(path, ranges, h, base=lo)
    return read


def _spread_ranges(size: int) -> list[tuple[int, int]]:
    ranges = [(0, min(size, HEAD_BYTES))]
    if size > HEAD_BYTES:
        step = (size - HEAD_BYTES) // SPREAD_SAMPLES
        ranges += [(HEAD_BYTES + i * step, min(size, HEAD_BYTES + i * step + SAMPLE_BYTES))
                   for i in range(SPREAD_SAMPLES)]
        ranges.append((max(0, size - SAMPLE_BYTES), size))
    return ranges


def _hash_files(h, files: list[Path], full: bool) -> int:
    """Other formats: each file's name, size and bytes (all of them, or the head and spread samples)."""
    read = 0
    for path in files:
        size = path.stat().st_size
        h.update(f"file\0{path.name}\0{size}\0".encode())
        read += _read(path, [(0, size)] if full else _spread_ranges(size), h)
    return read


# config.json keys that record who wrote the file, not what the model computes
_VOLATILE = ("transformers_version", "_name_or_path", "_commit_hash")


def _config_bytes(root: Path) -> tuple[bytes, str]:
    """Canonical config.json (sorted keys, minus ``_VOLATILE``) and the model type; raw bytes if it
    does not parse."""
    config = root / "config.json" if root.is_dir() else None
    if config is None or not config.is_file():
        return b"", "model"
    raw = config.read_bytes()
    try:
        doc = json.loads(raw)
    except ValueError:
        return raw, "model"
    if not isinstance(doc, dict):
        return raw, "model"
    for k in _VOLATILE:
        doc.pop(k, None)
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode(), str(doc.get("model_type") or "model")


def _compute(root: Path, full: bool) -> ModelIdentity | None:
    weights = _weight_files(root)
    if not weights:
        return None
    h = hashlib.blake2b(digest_size=16)
    h.update(f"kvd-model\0{FORMAT}\0{'full' if full else 'sampled'}\0".encode())
    config, model_type = _config_bytes(root)
    h.update(b"config\0" + struct.pack("<Q", len(config)) + config)
    read = len(config)
    tensors = _hash_tensors(h, weights, full) if weights[0].suffix == ".safetensors" else None
    if tensors is None:
        h.update(b"files\0")
        tensors = _hash_files(h, weights, full)
    digest = h.hexdigest()
    safe_type = "".join(c for c in model_type if c.isalnum() or c in "_-.")[:64] or "model"
    return ModelIdentity(f"{safe_type}@{digest}", digest, tuple(p.name for p in weights), read + tensors)


_CACHE: dict[tuple, ModelIdentity | None] = {}


def overrides_tag(overrides: Any) -> str:
    """``cfg-<hash>`` of config overrides an engine applies on load (vLLM's ``hf_overrides``, SGLang's
    ``--json-model-override-args``), for ``choose_model_id``'s ``variant``: the content identity hashes
    the files' config.json, and any overridden value may change the KV."""
    blob = json.dumps(overrides, sort_keys=True, separators=(",", ":"), default=str).encode()
    return "cfg-" + hashlib.blake2b(blob, digest_size=8).hexdigest()


def _signature(root: Path) -> tuple:
    """What invalidates a cached identity: the files' names, inodes, sizes, modification times and
    change times (which no one can set back: bytes rewritten with the size and mtime kept still count)."""
    paths = _weight_files(root) + ([root / "config.json"] if root.is_dir() else [])
    out = []
    for p in paths:
        try:
            st = p.stat()
        except OSError:
            continue
        out.append((p.name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(out)


def model_identity(model_dir: str | os.PathLike, *, full: bool = False) -> ModelIdentity | None:
    """The content identity of a model directory (or a single weight file); None when it holds no
    weight files kvd knows (then nothing tells two models apart: the caller must fall back to a name).
    Computed once per process per directory (see the module docstring for what is read)."""
    root = Path(model_dir).expanduser().resolve()
    if not root.exists():
        return None
    key = (str(root), full, _signature(root))
    if key not in _CACHE:
        _CACHE[key] = ident = _compute(root, full)
        if ident is not None:
            logger.info("kvd: model %s is %s (%d weight files, %d bytes read)", root, ident.model_id,
                        len(ident.files), ident.bytes_read)
    return _CACHE[key]


def hub_cache_dirs() -> list[Path]:
    """Where the Hugging Face hub keeps snapshots, as huggingface_hub resolves it (stdlib only)."""
    if os.environ.get("HF_HUB_CACHE"):
        return [Path(os.environ["HF_HUB_CACHE"])]
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return [Path(os.environ["HUGGINGFACE_HUB_CACHE"])]
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return [Path(home).expanduser() / "hub"]


def resolve_model_dir(name_or_path: str | os.PathLike, revision: str | None = None) -> Path | None:
    """A local directory (or weight file) for what an engine was given: the path itself, or the
    snapshot of hub repo ``org/name`` at ``revision`` (a branch, tag or commit; default ``main``) in
    the local Hugging Face cache. None when neither exists (nothing is downloaded)."""
    p = Path(name_or_path).expanduser()
    if p.exists():
        return p
    name = str(name_or_path)
    if name.count("/") != 1 or name.startswith(("/", ".")):
        return None
    repo = "models--" + name.replace("/", "--")
    for cache in hub_cache_dirs():
        snaps = cache / repo / "snapshots"
        ref = revision or "main"
        ref_file = cache / repo / "refs" / ref
        commit = ref_file.read_text().strip() if ref_file.is_file() else ref
        if (snaps / commit).is_dir():
            return snaps / commit
    return None


def identify(name_or_path: str | os.PathLike, revision: str | None = None) -> ModelIdentity | None:
    """``model_identity(resolve_model_dir(...))``; None when there is no local copy to identify."""
    root = resolve_model_dir(name_or_path, revision)
    return None if root is None else model_identity(root)


def choose_model_id(name_or_path: str | os.PathLike, *, explicit: str | None = None, revision: str = "",
                    variant: str | None = None) -> tuple[str, str]:
    """``(model_id, revision)`` of an engine's ``ModelSpec``, the one rule every connector follows:

    - ``explicit`` (the ``model_id`` setting) wins, with the engine's ``revision``;
    - else the content identity of the local copy, with revision ``""`` (the bytes say it all, and an
      engine given a revision and one given the same snapshot's path must agree);
    - else (no local copy, or no weight files in it) the name itself, with ``revision``, and a warning:
      then only the name separates two models, as before kvd had identities.

    ``variant`` marks weights the engine changed on load (e.g. ``"fp8"``: quantized at load time, not in
    the files): appended as ``+fp8``, so such KV is never shared with an engine running the plain files.
    """
    suffix = f"+{variant}" if variant else ""
    if explicit:
        return explicit + suffix, revision
    ident = identify(name_or_path, revision or None)
    if ident is not None:
        return ident.model_id + suffix, ""
    logger.warning("kvd: no local model files for %r; its KV is keyed by that name only (set model_id to name "
                   "the weights, or give the engine a model directory)", str(name_or_path))
    return str(name_or_path) + suffix, revision


__all__ = ["ModelIdentity", "choose_model_id", "identify", "model_identity", "resolve_model_dir"]
