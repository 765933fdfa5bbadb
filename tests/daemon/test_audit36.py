"""Audit 36: crash consistency through the real daemon (kill -9 right after an answer)."""

from kvd.client import prefix as kvio
from kvd.core import protocol as P
from tests.daemon.test_service import HM, SPEC, kv_for
from tests.daemon_proc import DaemonProc


def test_a_delete_answered_stays_deleted_after_kill_9(tmp_path):
    """``kvctl delete`` answered once the entries left the index, their SSD records dropped by tasks
    still running (one fsync'd LMDB transaction each): a kill -9 right after the answer brought every
    deleted entry back at the restart (the rebuild reads the records), e.g. KV an operator deleted
    because the model's weights changed under the same name."""
    d = DaemonProc(tmp_path, env_extra={"KVD_SSD__ADMIT_AFTER": "100"})
    seqs = [[i * 1000 + k for k in range(512)] for i in range(20)]
    try:
        d.start()
        with d.client(timeout_s=10) as c:
            h = kvio.register(c, SPEC, HM)
            for t in seqs:
                kvio.store_prefix(h, t, kv_for(SPEC, 512, 1))
            assert c.flush(P.FlushRequest(fingerprint=h.fingerprint)).count == 40
            hashes = [x for t in seqs for x in h.hashes(t)]
            assert c.delete(P.EntriesRequest(fingerprint=h.fingerprint, hashes=hashes)).count == 40
        d.kill()
        d.start()
        with d.client(timeout_s=10) as c:
            h = kvio.register(c, SPEC, HM)
            assert sum(kvio.lookup_prefix(h, t).num_prefix_hits for t in seqs) == 0
            assert [t.num_records for t in c.stats().tiers if t.name == "ssd"] == [0]
    finally:
        d.kill()
