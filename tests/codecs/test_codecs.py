"""Codecs: bit-exact lossless round trips (hypothesis), lossy error bounds, the lossy math itself,
and the payload framing's failure modes."""

from __future__ import annotations

import struct
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvd.codecs import Codecs, get_codec, payload_info, raw_nbytes
from kvd.codecs.framing import PROBE_BYTES
from kvd.core.config import CodecSettings
from kvd.core.dtypes import DTYPE_BYTES
from kvd.core.errors import CorruptData, InvalidRequest, StorageFormatError

CODECS = Codecs(CodecSettings(zstd_level=1, threads=1))
EXACT = ("raw", "lossless")


@st.composite
def extents(draw, dtypes=tuple(DTYPE_BYTES)):  # every KV dtype kvd accepts, fp8 included
    """Any bit patterns at all, in a small (segments, tokens, head_dim) shape."""
    dtype = draw(st.sampled_from(dtypes))
    shape = (draw(st.integers(0, 3)), draw(st.integers(0, 9)), draw(st.integers(0, 9)))
    raw = draw(st.binary(min_size=raw_nbytes(dtype, shape), max_size=raw_nbytes(dtype, shape)))
    return dtype, shape, raw


@settings(max_examples=300, deadline=None)
@given(extents(), st.sampled_from(EXACT))
def test_exact_codecs_round_trip_any_bit_pattern(ext, name):
    dtype, shape, raw = ext
    payload = CODECS.get(name).encode(raw, dtype=dtype, shape=shape)
    assert bytes(CODECS.get(name).decode(payload, dtype=dtype, shape=shape)) == raw


def _special_values(dtype: str) -> np.ndarray:
    """NaN payloads (quiet, signalling, negative), ±Inf, ±0, subnormals, extremes, as bit patterns."""
    if dtype == "float32":
        bits = [0x7FC00000, 0x7FC00001, 0x7F800001, 0xFFFFFFFF, 0x7F800000, 0xFF800000, 0x00000000,
                0x80000000, 0x00000001, 0x807FFFFF, 0x7F7FFFFF, 0xFF7FFFFF, 0x3F800000]
        return np.array(bits, dtype=np.uint32)
    if dtype == "bfloat16":
        bits = [0x7FC0, 0x7FC1, 0x7F81, 0xFFFF, 0x7F80, 0xFF80, 0x0000, 0x8000, 0x0001, 0x807F, 0x7F7F, 0x3F80]
    else:  # float16
        bits = [0x7E00, 0x7E01, 0x7C01, 0xFFFF, 0x7C00, 0xFC00, 0x0000, 0x8000, 0x0001, 0x83FF, 0x7BFF, 0x3C00]
    return np.array(bits, dtype=np.uint16)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("name", EXACT)
def test_exact_codecs_keep_nan_payloads_inf_and_negative_zero(dtype, name):
    special = _special_values(dtype)
    shape = (3, 40, 8)  # 1,920 elements: the specials tiled, so every plane has every pattern
    arr = np.resize(special, raw_nbytes(dtype, shape) // DTYPE_BYTES[dtype])
    payload = CODECS.get(name).encode(arr.tobytes(), dtype=dtype, shape=shape)
    assert bytes(CODECS.get(name).decode(payload, dtype=dtype, shape=shape)) == arr.tobytes()


def _kv_like(shape, dtype="bfloat16", seed=0) -> bytes:
    """K with fixed outlier channels and V with per-token magnitudes, like real KV."""
    s, t, d = shape
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(s, t, d, generator=g) * (1 + 8 * (torch.arange(d) % 7 == 0))
    v = torch.randn(s, t, d, generator=g) * torch.rand(s, t, 1, generator=g) * 3
    x = torch.stack([k, v], dim=1).to(getattr(torch, dtype))
    return x.reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_lossless_compresses_exponent_plane_of_large_extent(dtype):
    shape = (8, 256, 64)  # 512 KiB in bf16: past the probe, through zstd
    raw = _kv_like(shape, dtype)
    payload = CODECS.get("lossless").encode(raw, dtype=dtype, shape=shape)
    assert len(raw) > 2 * PROBE_BYTES
    assert bytes(CODECS.get("lossless").decode(payload, dtype=dtype, shape=shape)) == raw
    # Only the exponent-bearing plane shrinks; mantissa planes are stored, so the gain is bounded.
    assert 1.1 < len(raw) / len(payload) < 2.0, len(raw) / len(payload)


def test_lossless_threaded_extent_round_trips():
    shape = (20, 256, 64)  # 1.25 MiB float32 → 5 MiB: zstd worker threads
    raw = _kv_like(shape, "float32")
    codecs = Codecs(CodecSettings(zstd_level=3, threads=2))
    payload = codecs.get("lossless").encode(raw, dtype="float32", shape=shape)
    assert bytes(codecs.get("lossless").decode(payload, dtype="float32", shape=shape)) == raw


# ---- lossy: the exact math, and its error ------------------------------------------------------


def _reference(raw: bytes, dtype: str, shape, qmax: float, to_q) -> torch.Tensor:
    """The lossy contract transcribed directly."""
    s, t, d = shape
    x = torch.frombuffer(bytearray(raw), dtype=getattr(torch, dtype)).view(s, 2, t, d).float()
    k, v = x[:, 0], x[:, 1]
    s_k = k.abs().amax(dim=1, keepdim=True) / qmax  # [S, 1, D]
    s_v = v.abs().amax(dim=2, keepdim=True) / qmax  # [S, T, 1]
    s_k[s_k == 0] = 1.0
    s_v[s_v == 0] = 1.0
    kq, vq = to_q(k / s_k), to_q(v / s_v)
    return torch.stack([kq.float() * s_k, vq.float() * s_v], dim=1).to(getattr(torch, dtype))


LOSSY = {
    "fp8": (448.0, lambda y: y.clamp(-448, 448).to(torch.float8_e4m3fn)),
    "int8": (127.0, lambda y: torch.round(y).clamp(-127, 127).to(torch.int8)),
}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("name", ["fp8", "int8"])
def test_lossy_codec_matches_the_reference_math_bit_for_bit(name, dtype):
    shape = (3, 37, 16)
    raw = _kv_like(shape, dtype, seed=3)
    out = CODECS.get(name).decode(CODECS.get(name).encode(raw, dtype=dtype, shape=shape), dtype=dtype, shape=shape)
    want = _reference(raw, dtype, shape, *LOSSY[name])
    assert bytes(out) == want.reshape(-1).view(torch.uint8).numpy().tobytes()


# Stated tolerance, per element: int8 rounds to the nearest of 255 levels (error ≤ s/2); fp8 e4m3 keeps
# 3 mantissa bits (relative error ≤ 2^-4 for normals) with absolute steps of s·2^-9 near zero; then
# the dequantized value is rounded to the dtype (bf16: relative 2^-8). Norm-wise, on KV-like data:
# int8 ≤ 1.5%, fp8 ≤ 4% relative error for K and for V.
@pytest.mark.parametrize("name", ["fp8", "int8"])
def test_lossy_error_is_bounded_per_element_and_in_norm(name):
    shape = (4, 128, 64)
    raw = _kv_like(shape, "bfloat16", seed=7)
    codec = CODECS.get(name)
    out = codec.decode(codec.encode(raw, dtype="bfloat16", shape=shape), dtype="bfloat16", shape=shape)
    x = torch.frombuffer(bytearray(raw), dtype=torch.bfloat16).view(4, 2, 128, 64).float()
    y = torch.frombuffer(out, dtype=torch.bfloat16).view(4, 2, 128, 64).float()
    s_k = x[:, 0].abs().amax(dim=1, keepdim=True) / LOSSY[name][0]
    s_v = x[:, 1].abs().amax(dim=2, keepdim=True) / LOSSY[name][0]
    for i, (tensor, s) in enumerate((("K", s_k), ("V", s_v))):
        err = (x[:, i] - y[:, i]).abs()
        if name == "int8":
            bound = 0.5 * s + x[:, i].abs() * 2**-8
        else:
            bound = x[:, i].abs() * (2**-4 + 2**-8) + s * 2**-9
        assert (err <= bound * 1.001 + 1e-30).all(), f"{name} {tensor}: max excess {(err - bound).max():.3g}"
        rel = ((x[:, i] - y[:, i]).norm() / x[:, i].norm()).item()
        assert rel <= (0.015 if name == "int8" else 0.04), f"{name} {tensor}: relative error {rel:.4f}"


@pytest.mark.parametrize("name", ["fp8", "int8"])
def test_lossy_zero_channel_gets_unit_scale_and_decodes_to_zero(name):
    shape = (1, 4, 4)
    x = torch.zeros(1, 2, 4, 4, dtype=torch.bfloat16)
    x[0, 0, :, 1] = 2.0  # one non-zero key channel; all other K channels and all V tokens are zero
    raw = x.reshape(-1).view(torch.uint8).numpy().tobytes()
    out = CODECS.get(name).decode(CODECS.get(name).encode(raw, dtype="bfloat16", shape=shape),
                                 dtype="bfloat16", shape=shape)
    assert bytes(out) == raw  # 2.0 = 448 (or 127) × (2/QMAX) is exact; zeros stay zero


@pytest.mark.parametrize("name", ["fp8", "int8"])
def test_lossy_codec_keeps_non_finite_extents_exact_through_lossless(name):
    shape = (2, 8, 4)
    arr = np.resize(_special_values("bfloat16"), raw_nbytes("bfloat16", shape) // 2)
    payload = CODECS.get(name).encode(arr.tobytes(), dtype="bfloat16", shape=shape)
    assert payload_info(payload).codec == "lossless"
    assert bytes(CODECS.get(name).decode(payload, dtype="bfloat16", shape=shape)) == arr.tobytes()


def test_fp8_table_equals_torch_cast_for_all_256_patterns():
    codec = CODECS.get("fp8")
    want = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    assert torch.equal(torch.from_numpy(codec._fp8_table).view(torch.int32), want.view(torch.int32))


def test_lossy_refuses_8_bit_kv():
    with pytest.raises(InvalidRequest, match="already 8-bit"):
        CODECS.get("fp8").encode(bytes(2 * 4 * 4), dtype="float8_e4m3fn", shape=(1, 4, 4))


# ---- framing and input errors -------------------------------------------------------------------


def test_unknown_codec_name_lists_the_supported_ones():
    with pytest.raises(InvalidRequest, match="raw, lossless, fp8, int8"):
        get_codec("zip")


def test_encode_rejects_length_that_does_not_fit_shape():
    with pytest.raises(InvalidRequest, match="does not match shape"):
        CODECS.get("lossless").encode(bytes(10), dtype="bfloat16", shape=(1, 2, 2))


def _payload() -> tuple[bytes, tuple[int, int, int]]:
    shape = (2, 64, 64)
    return CODECS.get("lossless").encode(_kv_like(shape), dtype="bfloat16", shape=shape), shape


def test_decode_rejects_a_payload_of_another_shape_or_dtype():
    payload, shape = _payload()
    with pytest.raises(CorruptData, match="caller expected"):
        CODECS.get("lossless").decode(payload, dtype="float16", shape=shape)


@pytest.mark.parametrize("damage", ["magic", "truncate", "extend", "plane_table", "zstd_bytes"])
def test_damaged_payload_raises_corrupt_data(damage):
    payload, shape = _payload()
    buf = bytearray(payload)
    if damage == "magic":
        buf[0] ^= 0xFF
    elif damage == "truncate":
        del buf[-5:]
    elif damage == "extend":
        buf += b"\0"
    elif damage == "plane_table":
        buf[28 + 9] ^= 0x01  # plane 0's plane length
    else:  # plane 0 (low bytes) is stored as it is; plane 1 (high bytes) is a zstd frame
        plane1 = 28 + 2 * 17 + raw_nbytes("bfloat16", shape) // 2
        buf[plane1 : plane1 + 4] = b"\0\0\0\0"  # its frame magic
    # Damage inside compressed or stored bytes that still parses is the SSD tier's checksums' job.
    with pytest.raises(CorruptData):
        CODECS.get("lossless").decode(bytes(buf), dtype="bfloat16", shape=shape)


def test_newer_payload_version_is_a_format_error():
    payload, shape = _payload()
    buf = bytearray(payload)
    struct.pack_into("<B", buf, 4, 99)
    with pytest.raises(StorageFormatError, match="version 99"):
        payload_info(bytes(buf))


def test_codecs_are_safe_to_share_between_threads():
    codec = CODECS.get("lossless")
    shape = (4, 256, 64)
    inputs = [_kv_like(shape, seed=i) for i in range(4)]
    errors: list[str] = []

    def work(raw: bytes) -> None:
        for _ in range(5):
            if bytes(codec.decode(codec.encode(raw, dtype="bfloat16", shape=shape), dtype="bfloat16",
                                  shape=shape)) != raw:
                errors.append("mismatch")

    threads = [threading.Thread(target=work, args=(r,)) for r in inputs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# ---- audit 14 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fp8", "int8"])
def test_lossy_decode_of_the_largest_fp32_values_stays_finite(name):
    """int8 decoded fp32 KV at ±fp32 max as ±Inf: q × s = 127 × (max / 127) rounds past the largest
    float. Every finite extent must decode finite and within the stated error."""
    fmax = torch.finfo(torch.float32).max
    x = torch.full((1, 2, 4, 4), fmax)
    x[0, :, 1::2] *= -1
    x[0, 1, 0] = fmax / 3
    raw = x.reshape(-1).view(torch.uint8).numpy().tobytes()
    codec = CODECS.get(name)
    out = codec.decode(codec.encode(raw, dtype="float32", shape=(1, 4, 4)), dtype="float32", shape=(1, 4, 4))
    y = torch.frombuffer(out, dtype=torch.float32).view(1, 2, 4, 4)
    assert torch.isfinite(y).all(), f"{name} decoded finite fp32 KV as {y[~torch.isfinite(y)][:2].tolist()}"
    assert ((y.double() - x.double()).abs() <= x.double().abs() * 2**-4).all()


@pytest.mark.parametrize("shape", [(0, 0, 0), (0, 4, 4), (1, 0, 64), (2, 5, 0)])
@pytest.mark.parametrize("name", ["fp8", "int8"])
def test_lossy_codecs_round_trip_empty_extents(name, shape):
    """An empty extent with segments (0 tokens or head_dim 0) was framed with an empty scale plane, and
    its decode wanted s × (d + t) scales: the codec's own payload did not decode (CorruptData)."""
    codec = CODECS.get(name)
    assert codec.decode(codec.encode(b"", dtype="bfloat16", shape=shape), dtype="bfloat16", shape=shape) == b""


@pytest.mark.parametrize("name", ["raw", "lossless", "fp8", "int8"])
def test_every_truncation_of_a_payload_raises_corrupt_data(name):
    """A payload cut inside its plane table raised struct.error, not the CorruptData decode promises."""
    shape = (2, 8, 4)
    payload = CODECS.get(name).encode(_kv_like(shape), dtype="bfloat16", shape=shape)
    for n in range(len(payload)):
        with pytest.raises(CorruptData):
            CODECS.get(name).decode(payload[:n], dtype="bfloat16", shape=shape)


REL = {"bfloat16": 2**-8, "float16": 2**-11, "float32": 2**-24}  # rounding back to the dtype, relative
TINY = {"bfloat16": 2.0**-133, "float16": 2.0**-24, "float32": 2.0**-149}  # its smallest subnormal


@settings(max_examples=300, deadline=None)
@given(extents(("bfloat16", "float16", "float32")), st.sampled_from(["fp8", "int8"]))
def test_lossy_codecs_keep_any_finite_extent_finite_and_within_the_stated_error(ext, name):
    """Any finite bit patterns (NaN/Inf zeroed): subnormals, extremes, constant runs. Error per element
    as in the test above, plus a few subnormal steps (a subnormal scale is itself rounded)."""
    dtype, shape, raw = ext
    s, t, d = shape
    x = torch.frombuffer(bytearray(raw), dtype=getattr(torch, dtype)) if raw else torch.zeros(0)
    x = x.masked_fill(~torch.isfinite(x), 0).to(getattr(torch, dtype))
    raw = x.view(torch.uint8).numpy().tobytes()
    codec = CODECS.get(name)
    out = codec.decode(codec.encode(raw, dtype=dtype, shape=shape), dtype=dtype, shape=shape)
    if not raw:
        return
    xs = x.double().view(s, 2, t, d)
    y = torch.frombuffer(out, dtype=getattr(torch, dtype)).double().view(s, 2, t, d)
    assert torch.isfinite(y).all()
    qmax = LOSSY[name][0]
    for i, sc in ((0, xs[:, 0].abs().amax(dim=1, keepdim=True) / qmax), (1, xs[:, 1].abs().amax(dim=2, keepdim=True) / qmax)):
        err, a = (xs[:, i] - y[:, i]).abs(), xs[:, i].abs()
        bound = 0.5 * sc + a * REL[dtype] if name == "int8" else a * (2**-4 + REL[dtype]) + sc * 2**-9
        assert (err <= bound * 1.001 + 300 * TINY["float32"] + 2 * TINY[dtype]).all()
