"""Audit 14 (codecs, records, lossy handling): defects found in the store's use of the codecs."""

from __future__ import annotations

from tests.store.test_pipeline import MODEL, World


async def test_fp8_kv_with_a_lossy_cold_codec_still_reaches_ssd(tmp_path):
    """fp8 KV cannot be quantized further: the lossy codec refused it (InvalidRequest), so with
    ``local_cold_codec = fp8`` no cold local extent of an fp8 model was ever written to SSD (logged as
    an unreadable source, and retried at every write-back). It is now kept exact (``lossless``), as an
    extent holding NaN/Inf is."""
    w = World(tmp_path, model=MODEL.model_copy(update={"kv_dtype": "float8_e4m3fn"}),
              codec={"local_cold_codec": "fp8"}, ssd={"admit_after": 1})
    try:
        hs, data = await w.store_seq(3)
        await w.step()
        cold = w.entry(hs[1]).extents["local"]
        assert "ssd" in cold.copies, "the cold local extent of an fp8 model never reached SSD"
        assert cold.copies["ssd"].codec == "lossless" and not cold.copies["ssd"].is_lossy
        status, got = await w.read_back(hs[1:2])  # exact, so an exact reader gets it
        assert status == ["ok"] and got[(hs[1], "local")] == data[(hs[1], "local")]
    finally:
        w.close()
