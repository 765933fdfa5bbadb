"""Model identity (kvd.core.identity): equal for the same weights wherever they live, different for
different weights even under the same name and shapes; a hub snapshot resolves like its path."""

from __future__ import annotations

import json
import os
import shutil
import struct
import time

import numpy as np
import pytest

from kvd.core import identity
from kvd.core.identity import choose_model_id, model_identity, resolve_model_dir

CONFIG = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64}


def write_safetensors(path, tensors: dict[str, np.ndarray]) -> None:
    """A minimal safetensors file (header JSON + raw little-endian data), as the format defines it."""
    meta, blobs, off = {}, [], 0
    for name, arr in tensors.items():
        b = np.ascontiguousarray(arr).tobytes()
        meta[name] = {"dtype": {"float32": "F32", "float16": "F16"}[str(arr.dtype)], "shape": list(arr.shape),
                      "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    header = json.dumps(meta).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"".join(blobs))


def make_model(root, seed: int = 0, config: dict | None = None, name: str = "model.safetensors"):
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config or CONFIG))
    (root / "tokenizer.json").write_text('{"v": 1}')
    rng = np.random.default_rng(seed)
    write_safetensors(root / name, {"embed": rng.standard_normal((512, 64), dtype=np.float32),
                                    "layers.0.q": rng.standard_normal((64, 64), dtype=np.float32),
                                    "norm": np.ones(64, dtype=np.float32)})
    return root


def test_same_bytes_under_another_path_and_name_have_one_identity(tmp_path):
    a = make_model(tmp_path / "smollm2")
    b = tmp_path / "elsewhere" / "some-other-name"
    shutil.copytree(a, b)
    ia, ib = model_identity(a), model_identity(b)
    assert ia.model_id == ib.model_id and ia.model_id.startswith("llama@")
    assert ia.files == ("model.safetensors",)


def test_a_fine_tune_with_the_same_name_and_shapes_differs(tmp_path):
    """Training moves weights densely: perturbing one tensor by 1e-3 relative changes the identity."""
    base = make_model(tmp_path / "base")
    tuned = make_model(tmp_path / "tuned")
    data = bytearray((tuned / "model.safetensors").read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8:8 + n])
    lo, hi = meta["layers.0.q"]["data_offsets"]
    w = np.frombuffer(bytes(data[8 + n + lo:8 + n + hi]), dtype=np.float32)
    data[8 + n + lo:8 + n + hi] = (w * (1 + 1e-3)).astype(np.float32).tobytes()
    (tuned / "model.safetensors").write_bytes(bytes(data))
    assert model_identity(base).model_id != model_identity(tuned).model_id


def test_only_sampled_bytes_count_a_change_between_samples_is_not_seen(tmp_path):
    """The documented limit: one value far from every sample of a large tensor (ask for full=True)."""
    base = make_model(tmp_path / "base")
    edit = make_model(tmp_path / "edit")
    data = bytearray((edit / "model.safetensors").read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    lo, _ = json.loads(data[8:8 + n])["embed"]["data_offsets"]
    at = 8 + n + lo + 3 * identity.SAMPLE_BYTES  # between the start and middle samples of "embed" (128 KiB)
    data[at:at + 4] = np.float32(7.0).tobytes()
    (edit / "model.safetensors").write_bytes(bytes(data))
    assert model_identity(base).model_id == model_identity(edit).model_id
    assert model_identity(base, full=True).model_id != model_identity(edit, full=True).model_id


def test_sharding_layout_order_and_who_wrote_the_config_do_not_count(tmp_path):
    """The same tensors in two shards in another order, and a config saved by another transformers
    version with its keys reordered: one identity."""
    a = make_model(tmp_path / "a")
    rng = np.random.default_rng(0)
    embed, q = rng.standard_normal((512, 64), dtype=np.float32), rng.standard_normal((64, 64), dtype=np.float32)
    b = tmp_path / "b"
    b.mkdir()
    write_safetensors(b / "model-00001-of-00002.safetensors", {"norm": np.ones(64, dtype=np.float32), "layers.0.q": q})
    write_safetensors(b / "model-00002-of-00002.safetensors", {"embed": embed})
    cfg = {"transformers_version": "4.99.0", **dict(reversed(list(CONFIG.items())))}
    (b / "config.json").write_text(json.dumps(cfg, indent=2))
    assert model_identity(a).model_id == model_identity(b).model_id


def test_config_changes_identity_tokenizer_does_not(tmp_path):
    a = make_model(tmp_path / "a")
    b = make_model(tmp_path / "b", config={**CONFIG, "rope_theta": 500000.0})
    c = make_model(tmp_path / "c")
    (c / "tokenizer.json").write_text('{"v": 2}')
    assert model_identity(a).model_id != model_identity(b).model_id
    assert model_identity(a).model_id == model_identity(c).model_id


def test_safetensors_preferred_over_pickles_beside_them(tmp_path):
    a = make_model(tmp_path / "a")
    b = make_model(tmp_path / "b")
    (b / "pytorch_model.bin").write_bytes(os.urandom(1000))
    assert model_identity(a).model_id == model_identity(b).model_id
    c = tmp_path / "c"
    c.mkdir()
    (c / "config.json").write_text(json.dumps(CONFIG))
    (c / "pytorch_model.bin").write_bytes(os.urandom(3 << 20))
    assert model_identity(c).files == ("pytorch_model.bin",)


def test_no_weight_files_means_no_identity_and_the_name_is_used(tmp_path, caplog):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    assert model_identity(tmp_path / "empty") is None
    assert choose_model_id(str(tmp_path / "empty"), revision="r1") == (str(tmp_path / "empty"), "r1")
    assert "keyed by that name only" in caplog.text


def test_explicit_model_id_wins_and_keeps_the_revision(tmp_path):
    a = make_model(tmp_path / "a")
    assert choose_model_id(a, explicit="mine", revision="v2") == ("mine", "v2")
    mid, rev = choose_model_id(a, revision="v2")
    assert mid == model_identity(a).model_id and rev == ""  # the bytes say it all
    assert choose_model_id(a, variant="fp8")[0] == model_identity(a).model_id + "+fp8"


def test_cached_per_process_and_recomputed_when_files_change(tmp_path, monkeypatch):
    a = make_model(tmp_path / "a")
    calls = []
    real = identity._compute
    monkeypatch.setattr(identity, "_compute", lambda root, full: calls.append(root) or real(root, full))
    first = model_identity(a)
    assert model_identity(a) is first and len(calls) == 1
    time.sleep(0.01)
    make_model(a, seed=1)
    assert model_identity(a).model_id != first.model_id and len(calls) == 2


def test_hub_name_resolves_to_its_snapshot_in_the_local_cache(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    snap = make_model(hub / "models--Org--Tiny" / "snapshots" / "abc123")
    (hub / "models--Org--Tiny" / "refs").mkdir()
    (hub / "models--Org--Tiny" / "refs" / "main").write_text("abc123\n")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    assert resolve_model_dir("Org/Tiny") == snap
    assert resolve_model_dir("Org/Tiny", "abc123") == snap
    assert resolve_model_dir("Org/Other") is None
    assert choose_model_id("Org/Tiny")[0] == model_identity(snap).model_id


@pytest.mark.model
def test_smollm2_identity_reads_little(smollm2_dir):
    """The real model: one file, 272 tensors: header plus 3 samples per tensor, well under 1% of it."""
    ident = model_identity(smollm2_dir)
    size = (smollm2_dir / "model.safetensors").stat().st_size
    assert ident.model_id.startswith("llama@")
    assert ident.bytes_read < 0.02 * size


def test_a_file_rewritten_with_its_size_and_mtime_kept_is_identified_again(tmp_path):
    """The per-process cache must not outlive the bytes: weights replaced by others of the same size
    with the old modification time put back (``cp -p``, ``rsync -t``, ``tar x``, or files whose mtime a
    build pinned) are other weights. The cache keyed on name, size and mtime kept the old identity."""
    a = make_model(tmp_path / "a")
    weights = a / "model.safetensors"
    st = weights.stat()
    first = model_identity(a)
    other = make_model(tmp_path / "other", seed=1) / "model.safetensors"
    assert other.stat().st_size == st.st_size
    weights.write_bytes(other.read_bytes())
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.stat().st_mtime_ns == st.st_mtime_ns
    assert model_identity(a).model_id != first.model_id
    assert model_identity(a).model_id == model_identity(tmp_path / "other").model_id


def test_a_tensor_name_in_two_files_counts_in_both(tmp_path):
    """A directory holding its shards and a leftover single file with the same tensor names (vLLM and
    transformers load the shards the index names): the identity hashed only the name's last file in
    sorted order, so two models with different shards beside the same leftover got one identity."""
    rng = np.random.default_rng(7)
    leftover = {"embed": rng.standard_normal((512, 64), dtype=np.float32),
                "layers.0.q": rng.standard_normal((64, 64), dtype=np.float32), "norm": np.ones(64, dtype=np.float32)}
    ids = []
    for seed in (1, 2):
        root = tmp_path / f"m{seed}"
        make_model(root, seed=seed, name="model-00001-of-00001.safetensors")
        write_safetensors(root / "model.safetensors", leftover)  # sorts after the shard: it won
        ids.append(model_identity(root).model_id)
    assert ids[0] != ids[1]
