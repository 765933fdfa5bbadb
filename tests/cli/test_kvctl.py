"""kvctl against a live daemon: human tables, --json, exit codes, reasons, the one counter source."""

import json
import subprocess
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from kvd.cli.kvctl import main as kvctl_main
from kvd.core import protocol as P


def run(live, *args, capsys):
    code = kvctl_main(["--socket", live.socket, *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_status_and_stats_tables(live, capsys):
    code, out, _ = run(live, "status", capsys=capsys)
    with live.client() as c:
        n = c.stats().num_entries
    assert code == 0 and "ok" in out and f"entries {n}" in out and n >= 5
    code, out, _ = run(live, "stats", capsys=capsys)
    assert code == 0 and out.splitlines()[0].split()[:3] == ["TIER", "USED", "CAPACITY"] and "host" in out


def test_tables_show_prefixes_that_commands_take_back(live, capsys):
    """Tables showed 16-character hashes and 12-character fingerprints that commands then rejected."""
    code, out, _ = run(live, "ls", "--tier", "host", capsys=capsys)
    shown = {line.split()[0] for line in out.splitlines()[2:]}
    assert code == 0 and {h[:12] for h in live.hashes} <= shown
    code, out, _ = run(live, "models", capsys=capsys)
    fp_shown = out.splitlines()[2].split()[0]
    assert code == 0 and live.fp.startswith(fp_shown) and "toy" in out
    code, out, _ = run(live, "--json", "ls", "--model", fp_shown, capsys=capsys)
    assert code == 0 and set(live.hashes) <= {e["hash"] for e in json.loads(out)["entries"]}
    code, out, err = run(live, "pin", live.hashes[0][:12], capsys=capsys)
    assert (code, out.strip(), err) == (0, "pinned 1 of 1 entries", "")
    assert run(live, "unpin", live.hashes[0][:12], capsys=capsys)[0] == 0


def test_pin_without_namespace_finds_the_entry_and_reports_json(live, capsys):
    code, out, _ = run(live, "--json", "pin", live.hashes[0], capsys=capsys)
    assert code == 0 and json.loads(out) == {"count": 1, "asked": 1}
    code, out, _ = run(live, "--json", "ls", capsys=capsys)
    pinned = {e["hash"]: e["pinned"] for e in json.loads(out)["entries"]}
    assert pinned[live.hashes[0]] and not pinned[live.hashes[1]]
    code, out, _ = run(live, "unpin", live.hashes[0], capsys=capsys)
    assert code == 0 and "unpinned 1 of 1" in out


def test_every_failure_says_why(live, tmp_path, capsys):
    cases = [
        (["pin", "0" * 32], 1, "no entry has hash"),
        (["pin", "not-a-hash"], 2, "not a hex prefix"),
        (["pin", live.hashes[0], "--namespace", "other"], 1, "in namespace other"),
        (["ls", "--limit", "-1"], 2, "--limit -1"),
        (["ls", "--model", "ffffffff"], 1, "no registered model"),
        (["pin", live.twins[0][:4]], 2, "ambiguous"),
    ]
    for argv, want_code, want in cases:
        code, out, err = run(live, *argv, capsys=capsys)
        assert code == want_code and want in err and "/v1/" not in err, (argv, code, err)
    assert kvctl_main(["--socket", str(tmp_path / "none.sock"), "status"]) == 1
    err = capsys.readouterr().err
    assert "unreachable" in err and "socket from --socket" in err
    assert kvctl_main(["frobnicate"]) == 2
    capsys.readouterr()


def test_a_bad_timeout_is_a_usage_error(tmp_path, capsys):
    """``--timeout -1`` (or nan, inf) ended kvctl with a ValueError traceback from the socket (audit 7)."""
    for value in ("-1", "nan", "inf", "0", "soon"):
        assert kvctl_main(["--socket", str(tmp_path / "none.sock"), f"--timeout={value}", "status"]) == 2, value
        err = capsys.readouterr().err
        assert "--timeout" in err and "seconds" in err, (value, err)


def test_ls_limit_zero_lists_everything(live, capsys):
    """``ls --limit 0`` answered with the daemon's internal URL in an error."""
    code, out, err = run(live, "--json", "ls", "--limit", "0", capsys=capsys)
    with live.client() as c:
        n = c.stats().num_entries
    assert code == 0 and err == "" and len(json.loads(out)["entries"]) == n
    code, out, _ = run(live, "ls", "--limit", "2", capsys=capsys)
    assert code == 0 and "(first 2 shown" in out


def test_compact_json_names_its_unit(live, capsys):
    """``compact --json`` returned reclaimed bytes under ``count``."""
    code, out, _ = run(live, "--json", "compact", capsys=capsys)
    doc = json.loads(out)
    assert code == 0 and set(doc) == {"reclaimed_bytes"} and doc["reclaimed_bytes"] >= 0


def test_config_show(live, capsys):
    code, out, _ = run(live, "config", "show", capsys=capsys)
    assert code == 0 and "[keys]" in out and "chunk_tokens = 256" in out
    code, out, _ = run(live, "--json", "config", "show", capsys=capsys)
    assert json.loads(out)["host"]["capacity_bytes"] == 64 << 20


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
    with live.client() as c:
        c.lookup(P.LookupRequest(fingerprint=live.fp, prefix_hashes=live.hashes))
        c.flush(P.FlushRequest())  # demotions to SSD, done before both reads
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
                 'kvd_committed_entries_total{kind="prefix"}', 'kvd_demotions_total{head_class="global",tier="ssd"}',
                 'kvd_tier_writes_total{tier="ssd"}'):
        assert shared[name] == served[name] > 0, name
    assert shared["kvd_admission_refusals_total"] == served["kvd_admission_refusals_total"]
    assert set(shared) <= set(served)


def test_evict_dry_run_changes_nothing(live, capsys):
    before = {e["hash"] for e in json.loads(run(live, "--json", "ls", "--tier", "host", capsys=capsys)[1])["entries"]}
    code, out, _ = run(live, "--json", "evict", "--tier", "host", "--max-bytes", "1", "--dry-run", capsys=capsys)
    doc = json.loads(out)
    assert code == 0 and doc["dry_run"] and doc["count"] == 1 and doc["nbytes"] > 0
    code, out, _ = run(live, "--json", "ls", "--tier", "host", capsys=capsys)
    assert {e["hash"] for e in json.loads(out)["entries"]} == before  # still there


def test_evict_max_bytes_takes_a_size_as_the_settings_spell_it(live, capsys):
    """``--max-bytes 1K`` was a usage error (an int only) where every size setting takes units."""
    code, out, _ = run(live, "--json", "evict", "--tier", "host", "--max-bytes", "1K", "--dry-run", capsys=capsys)
    assert code == 0 and json.loads(out)["count"] == 1
    code, _, err = run(live, "evict", "--max-bytes", "1X", "--dry-run", capsys=capsys)
    assert code == 2 and "'1X' is not a size" in err


def test_an_entry_named_twice_is_counted_once(live, capsys):
    """Two prefixes of one entry (or one hash given twice) made the daemon select that entry twice:
    kvctl printed "deleted 2 of 2 entries" and the admin log "2 deleted" for the one entry there was."""
    h = live.spare[5]  # test_kvctl_table deletes spare[0..4]
    code, out, err = run(live, "--json", "delete", h[:8], h, capsys=capsys)
    assert (code, json.loads(out), err) == (0, {"count": 1, "asked": 1}, "")
    assert f"delete 1 entries (namespace default, model {live.fp[:12]})" in live.log.read_text()
    with live.client() as c:  # a client that sends a hash twice: the count is of entries, as done
        twice = P.EntriesRequest(fingerprint=live.fp, hashes=[live.hashes[2]] * 2)
        assert c.pin(twice).count == 1 and c.unpin(twice).count == 1
