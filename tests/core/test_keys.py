import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvd.core.errors import InvalidRequest
from kvd.core.keys import (
    ModelSpec,
    SegmentKey,
    check_hash,
    chunk_spans,
    content_hash,
    fingerprint,
    prefix_hashes,
    prefix_tail_hash,
)

SPEC = ModelSpec("smollm2-135m", num_layers=30, num_kv_heads=3, head_dim=64, kv_dtype="bfloat16",
                 rope={"rope_theta": 100000.0, "rope_type": "default"})


def test_fingerprint_changes_with_every_layout_field():
    base = fingerprint(SPEC)
    variants = [
        ModelSpec("other", 30, 3, 64, "bfloat16", rope=SPEC.rope),
        ModelSpec("smollm2-135m", 29, 3, 64, "bfloat16", rope=SPEC.rope),
        ModelSpec("smollm2-135m", 30, 4, 64, "bfloat16", rope=SPEC.rope),
        ModelSpec("smollm2-135m", 30, 3, 128, "bfloat16", rope=SPEC.rope),
        ModelSpec("smollm2-135m", 30, 3, 64, "float16", rope=SPEC.rope),
        ModelSpec("smollm2-135m", 30, 3, 64, "bfloat16", rope={"rope_theta": 10000.0}),
        ModelSpec("smollm2-135m", 30, 3, 64, "bfloat16", rope=SPEC.rope, revision="r2"),
        ModelSpec("smollm2-135m", 30, 3, 64, "bfloat16", rope=SPEC.rope, layout="vllm-cpu-vec"),
    ]
    fps = {fingerprint(v) for v in variants}
    assert base not in fps and len(fps) == len(variants)
    check_hash(base)


def test_hashes_are_stable_across_processes_and_hash_seeds():
    code = ("from kvd.core.keys import prefix_hashes, content_hash;"
            "print(prefix_hashes(list(range(1000)), chunk_tokens=256, namespace='n', fingerprint='f')[-1],"
            " content_hash([5, 6, 7], namespace='n', fingerprint='f'))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout for seed in ("1", "2", "random")}
    assert len(outs) == 1
    here = prefix_hashes(list(range(1000)), chunk_tokens=256, namespace="n", fingerprint="f")[-1]
    assert outs.pop().split()[0] == here


def test_prefix_hashes_cover_only_full_chunks():
    assert len(prefix_hashes(list(range(511)), chunk_tokens=256, namespace="n", fingerprint="f")) == 1
    assert len(prefix_hashes(list(range(512)), chunk_tokens=256, namespace="n", fingerprint="f")) == 2
    assert chunk_spans(600, 256) == [(0, 256), (256, 512)]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 2**31), min_size=0, max_size=300), st.integers(1, 64))
def test_prefix_hashes_of_a_prefix_are_a_prefix(tokens, chunk):
    full = prefix_hashes(tokens, chunk_tokens=chunk, namespace="n", fingerprint="f")
    part = prefix_hashes(tokens[: len(tokens) // 2], chunk_tokens=chunk, namespace="n", fingerprint="f")
    assert full[: len(part)] == part
    assert len(full) == len(tokens) // chunk


def test_namespace_and_model_separate_keys():
    t = list(range(256))
    a = prefix_hashes(t, chunk_tokens=256, namespace="a", fingerprint="f")
    b = prefix_hashes(t, chunk_tokens=256, namespace="b", fingerprint="f")
    c = prefix_hashes(t, chunk_tokens=256, namespace="a", fingerprint="g")
    assert len({a[0], b[0], c[0]}) == 3
    assert content_hash(t, namespace="a", fingerprint="f") != a[0]


def test_a_changed_earlier_chunk_changes_every_later_hash():
    t = list(range(1024))
    u = list(t)
    u[3] = 99999
    h1 = prefix_hashes(t, chunk_tokens=256, namespace="n", fingerprint="f")
    h2 = prefix_hashes(u, chunk_tokens=256, namespace="n", fingerprint="f")
    assert all(x != y for x, y in zip(h1, h2))


def test_token_arrays_and_lists_hash_alike():
    t = list(range(300))
    for arr in (np.array(t, dtype=np.int32), np.array(t, dtype=np.int64)):
        assert prefix_hashes(arr, chunk_tokens=100, namespace="n", fingerprint="f") == prefix_hashes(
            t, chunk_tokens=100, namespace="n", fingerprint="f")


@pytest.mark.parametrize("bad", [[-1, 2], [[1, 2]], [1.5, 2.0]])
def test_bad_token_ids_are_rejected(bad):
    with pytest.raises(InvalidRequest):
        prefix_hashes(bad, chunk_tokens=1, namespace="n", fingerprint="f")


def test_bad_specs_name_the_field():
    with pytest.raises(InvalidRequest, match="num_kv_heads"):
        ModelSpec("m", 2, 0, 64)
    with pytest.raises(InvalidRequest, match="kv_dtype"):
        ModelSpec("m", 2, 2, 64, kv_dtype="int4")
    assert SPEC.segment_bytes(256) == 65536
    assert str(SegmentKey(check_hash("0" * 32), 1, 2)).endswith("/L1/H2")


def test_prefix_tail_hash_chains_after_the_last_full_chunk():
    toks = list(range(1000, 1700))  # 2 chunks of 256, then 188 tokens
    kw = dict(chunk_tokens=256, namespace="ns", fingerprint="f" * 32)
    hs = prefix_hashes(toks, **kw)
    tail = prefix_tail_hash(toks, tail_tokens=128, parent=hs[-1], **kw)
    assert tail not in hs
    # The key depends only on the prefix and the tail's own tokens, not on what follows them.
    assert prefix_tail_hash(toks[:640], tail_tokens=128, parent=hs[-1], **kw) == tail
    assert prefix_tail_hash(toks[:639] + [7], tail_tokens=128, parent=hs[-1], **kw) != tail
    assert prefix_tail_hash(toks, tail_tokens=64, parent=hs[-1], **kw) != tail
    assert prefix_tail_hash(toks[:100], tail_tokens=64, parent=None, **kw) != tail
    with pytest.raises(InvalidRequest, match="tail has 1..188"):
        prefix_tail_hash(toks, tail_tokens=200, parent=hs[-1], **kw)
    with pytest.raises(InvalidRequest, match="parent must be"):
        prefix_tail_hash(toks, tail_tokens=128, parent=None, **kw)


# ---- ModelSpec.from_hf_config -------------------------------------------------------------------


def test_spec_from_hf_config_reads_a_transformers_5_config():
    from types import SimpleNamespace

    cfg = SimpleNamespace(num_attention_heads=9, hidden_size=576, num_hidden_layers=30, num_key_value_heads=3,
                          head_dim=64, rope_parameters={"rope_theta": 100000.0, "rope_type": "default"},
                          name_or_path="/models/smollm2-135m")
    spec = ModelSpec.from_hf_config(cfg)
    assert spec == ModelSpec("smollm2-135m", 30, 3, 64, "bfloat16", rope={"rope_theta": 100000.0,
                                                                            "rope_type": "default"})
    assert spec.rope is not cfg.rope_parameters  # a copy: later config edits do not change the spec
    assert ModelSpec.from_hf_config(cfg, model_id="x", kv_dtype="float32", revision="r1").fingerprint() != \
        spec.fingerprint()


def test_spec_from_hf_config_falls_back_for_older_configs():
    from types import SimpleNamespace

    # No head_dim, no KV head count (MHA), RoPE in rope_theta/rope_scaling, no name.
    cfg = SimpleNamespace(num_attention_heads=4, hidden_size=256, num_hidden_layers=2, rope_theta=10000.0,
                          rope_scaling=None, name_or_path="")
    spec = ModelSpec.from_hf_config(cfg)
    assert (spec.model_id, spec.num_kv_heads, spec.head_dim) == ("model", 4, 64)
    assert spec.rope == {"rope_theta": 10000.0, "rope_scaling": None}


@pytest.mark.model
def test_spec_from_hf_config_matches_smollm2(smollm2_fp32):
    model, _ = smollm2_fp32
    spec = ModelSpec.from_hf_config(model.config, model_id="smollm2-135m-instruct")
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (30, 3, 64)
    assert spec.rope["rope_theta"] == 100000.0
    assert spec.segment_bytes(1) == 256  # K+V of one token of one (layer, head), bf16
