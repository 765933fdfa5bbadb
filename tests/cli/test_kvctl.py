"""kvctl against a live daemon: human tables, --json, exit codes."""

import json
import subprocess
import sys

import pytest
import torch

from kvd.cli.kvctl import main as kvctl_main
from kvd.client import prefix as kvio
from kvd.core.headmap import HeadMap
from kvd.core.keys import ModelSpec
from tests.daemon_proc import DaemonProc

SPEC = ModelSpec("toy", num_layers=2, num_kv_heads=2, head_dim=32, kv_dtype="bfloat16")


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    d = DaemonProc(tmp_path_factory.mktemp("kvctl")).start()
    with d.client() as c:
        h = kvio.register(c, SPEC, HeadMap.from_classes("toy", [[True, False]] * 2, sink=4, window=64))
        kvio.store_prefix(h, list(range(768)), torch.zeros(2, 2, 2, 768, 32, dtype=torch.bfloat16) + 1)
        d.hashes = h.hashes(list(range(768)))
        d.fp = h.fingerprint
    yield d
    d.kill()


def run(live, *args, capsys):
    code = kvctl_main(["--socket", live.socket, *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_status_and_stats_tables(live, capsys):
    code, out, _ = run(live, "status", capsys=capsys)
    assert code == 0 and "ok" in out and "entries 3" in out
    code, out, _ = run(live, "stats", capsys=capsys)
    assert code == 0 and out.splitlines()[0].split()[:3] == ["TIER", "USED", "CAPACITY"] and "host" in out


def test_models_and_ls(live, capsys):
    code, out, _ = run(live, "models", capsys=capsys)
    assert code == 0 and "toy" in out and live.fp[:12] in out
    code, out, _ = run(live, "ls", "--tier", "host", capsys=capsys)
    assert code == 0 and sum(h[:16] in out for h in live.hashes) == 3
    code, out, _ = run(live, "--json", "ls", "--model", live.fp, capsys=capsys)
    doc = json.loads(out)
    assert code == 0 and {e["hash"] for e in doc["entries"]} == set(live.hashes)


def test_pin_unpin_json(live, capsys):
    code, out, _ = run(live, "--json", "pin", live.hashes[0], capsys=capsys)
    assert code == 0 and json.loads(out) == {"count": 1}
    code, out, _ = run(live, "--json", "ls", capsys=capsys)
    pinned = {e["hash"]: e["pinned"] for e in json.loads(out)["entries"]}
    assert pinned[live.hashes[0]] and not pinned[live.hashes[1]]
    code, out, _ = run(live, "unpin", live.hashes[0], capsys=capsys)
    assert code == 0 and "unpinned 1 of 1" in out
    code, _, _ = run(live, "pin", "0" * 32, capsys=capsys)
    assert code == 1  # nothing matched


def test_config_show(live, capsys):
    code, out, _ = run(live, "config", "show", capsys=capsys)
    assert code == 0 and "[keys]" in out and "chunk_tokens = 256" in out
    code, out, _ = run(live, "--json", "config", "show", capsys=capsys)
    assert json.loads(out)["host"]["capacity_bytes"] == 64 << 20


def test_exit_codes(live, tmp_path, capsys):
    code, _, err = run(live, "pin", "not-a-hash", capsys=capsys)
    assert code == 2 and "32 lowercase hex" in err
    assert kvctl_main(["--socket", str(tmp_path / "none.sock"), "status"]) == 1
    assert "unreachable" in capsys.readouterr().err
    assert kvctl_main(["frobnicate"]) == 2
    capsys.readouterr()


def test_console_script_runs(live):
    r = subprocess.run([sys.executable, "-m", "kvd.cli.kvctl", "--socket", live.socket, "--json", "status"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and json.loads(r.stdout)["health"]["status"] == "ok"


def test_profile_checks_its_model_dir(tmp_path, capsys):
    assert kvctl_main(["profile", str(tmp_path), "--out", str(tmp_path / "m.json")]) == 2
    assert "not a model directory" in capsys.readouterr().err
    assert kvctl_main(["ls", "--bogus"]) == 2


def test_stats_counters_equal_the_metrics_endpoint(live, capsys):
    """One counter source: ``kvctl stats`` reads the same numbers ``/metrics`` serves (they disagreed
    on admissions and demotions when the daemon kept a dict beside Prometheus)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with live.client() as c:
        c.lookup(__import__("kvd.core.protocol", fromlist=["P"]).LookupRequest(
            fingerprint=live.fp, prefix_hashes=live.hashes))
    code, out, _ = run(live, "--json", "stats", capsys=capsys)
    counters = json.loads(out)["counters"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{live.port}/metrics", timeout=10).read().decode()
    served = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if fam.type == "counter" and s.name.endswith("_total"):
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                served[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    shared = {k: v for k, v in counters.items() if not k.startswith("compression_ratio")}
    assert shared and code == 0
    # kvctl's read came first; counters only grow, and nothing happened in between but the scrape.
    for name in ('kvd_lookup_tokens_total{kind="prefix"}', 'kvd_hit_tokens_total{kind="prefix",tier="host"}',
                 'kvd_committed_entries_total{kind="prefix"}'):
        assert shared[name] == served[name] > 0, name
    assert set(shared) <= set(served)


def test_evict_dry_run_changes_nothing(live, capsys):
    code, out, _ = run(live, "--json", "evict", "--tier", "host", "--max-bytes", "1", "--dry-run", capsys=capsys)
    doc = json.loads(out)
    assert code == 0 and doc["dry_run"] and doc["count"] == 1 and doc["nbytes"] > 0
    code, out, _ = run(live, "--json", "ls", "--tier", "host", capsys=capsys)
    assert len(json.loads(out)["entries"]) == 3  # still there
