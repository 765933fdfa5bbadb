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


async def test_a_stray_write_in_the_arena_is_not_quantized_into_a_valid_lossy_record(tmp_path):
    """An arena copy overwritten after its commit (a client may write into the arena) was encoded for
    SSD without a look at its commit checksum. Lossless records took that checksum as theirs and failed
    at read; a lossy record's checksum is of its dequantized bytes, so the overwritten KV went to SSD
    as a valid fp8 record, the exact arena copy was let go (cold), and a lossy reader was served the
    overwritten bytes. The write-down now checks the commit checksum and drops the copy instead."""
    w = World(tmp_path, codec={"local_cold_codec": "fp8"}, ssd={"admit_after": 1})
    try:
        hs, data = await w.store_seq(4)
        x = w.entry(hs[1]).extents["local"]
        at = x.copies["host"].loc.offset
        w.host.view[at : at + 256] = bytes(256)  # a stray write: finite values (zeros), so fp8 scales it
        await w.step()
        status, got = await w.read_back(hs[1:2], accept_lossy=True)
        assert status != ["ok"], "overwritten KV was served to a lossy reader as valid"
        assert w.metric("kvd_checksum_failures_total", {"tier": "host"}) == 1
    finally:
        w.close()
