"""Every kvctl command, each with its global flags before the command, after it, and without
``--socket`` (``KVD_SOCKET``, the daemon's config file): the same answer every way. Hash prefixes
(unique and ambiguous) and output piped into ``head``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from kvd.cli.kvctl import main as kvctl_main


def _unique_prefix(a: str, b: str) -> str:
    n = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    return a[: n + 1]


# (command argv given the live daemon and the variant number, check of the JSON document)
ROWS = {
    "status": (lambda d, i: ["status"], lambda d, doc: doc["health"]["status"] == "ok"),
    "models": (lambda d, i: ["models"], lambda d, doc: [m["fingerprint"] for m in doc["models"]] == [d.fp]),
    "ls": (lambda d, i: ["ls", "--tier", "host", "--limit", "0", "--model", "toy"],
           lambda d, doc: set(d.hashes) <= {e["hash"] for e in doc["entries"]}),
    "stats": (lambda d, i: ["stats"], lambda d, doc: doc["lookup_tokens"] >= 0 and doc["counters"]),
    "pin": (lambda d, i: ["pin", d.hashes[1][:8]], lambda d, doc: doc == {"count": 1, "asked": 1}),
    "unpin": (lambda d, i: ["unpin", d.hashes[1][:8]], lambda d, doc: doc == {"count": 1, "asked": 1}),
    "pin-unique-prefix": (lambda d, i: ["pin", _unique_prefix(*d.twins)], lambda d, doc: doc["count"] == 1),
    "delete": (lambda d, i: ["delete", d.spare[i][:10]], lambda d, doc: doc == {"count": 1, "asked": 1}),
    "evict": (lambda d, i: ["evict", "--tier", "host", "--max-bytes", "1", "--dry-run"],
              lambda d, doc: doc["dry_run"] and doc["count"] == 1),
    "flush": (lambda d, i: ["flush", "--model", d.fp[:6]], lambda d, doc: doc["count"] == doc["asked"]),
    "compact": (lambda d, i: ["compact"], lambda d, doc: doc["reclaimed_bytes"] >= 0),
    "config": (lambda d, i: ["config", "show"], lambda d, doc: doc["host"]["capacity_bytes"] == 64 << 20),
    "files": (lambda d, i: ["files", "unit"], lambda d, doc: doc["unit"].endswith("kvd.service")),
}


def _variants(live, tmp_path, monkeypatch):
    """Ways to give the same global flags: (name, argv builder, environment to set)."""
    cfg = tmp_path / "kvd.toml"
    cfg.write_text(f'[daemon]\nsocket = "{live.socket}"\n')
    sock = ["--socket", live.socket]
    return [
        ("before", lambda cmd: [*sock, "--json", "--timeout", "20", *cmd], {}),
        ("after", lambda cmd: [*cmd, "--json", *sock, "--timeout", "20"], {}),
        ("KVD_SOCKET", lambda cmd: ["--json", *cmd], {"KVD_SOCKET": live.socket}),
        ("--config", lambda cmd: [*cmd, "--config", str(cfg), "--json"], {}),
        ("KVD_CONFIG", lambda cmd: [*cmd, "--json"], {"KVD_CONFIG": str(cfg)}),
    ]


@pytest.mark.parametrize("name", list(ROWS))
def test_command_answers_the_same_with_flags_anywhere(name, live, tmp_path, monkeypatch, capsys):
    argv_of, check = ROWS[name]
    for i, (how, build, env) in enumerate(_variants(live, tmp_path, monkeypatch)):
        with monkeypatch.context() as m:
            for k in ("KVD_SOCKET", "KVD_CONFIG", "KVD_DAEMON__SOCKET"):
                m.delenv(k, raising=False)
            for k, v in env.items():
                m.setenv(k, v)
            code = kvctl_main(build(argv_of(live, i)))
        out = capsys.readouterr()
        assert code == 0, (name, how, out.err)
        assert check(live, json.loads(out.out)), (name, how, out.out[:500])


def test_profile_takes_flags_anywhere(tmp_path, capsys):
    for argv in (["--json", "profile", str(tmp_path), "--out", "x.json"],
                 ["profile", str(tmp_path), "--json", "--out", "x.json", "--progress", "never"]):
        assert kvctl_main(argv) == 2
        assert "not a model directory" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:  # argparse's version action; main() turns it into 0
        from kvd.cli.kvctl import parser

        parser().parse_args(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("kvctl ")
    assert kvctl_main(["--version"]) == 0


def test_ambiguous_prefix_is_refused_with_the_candidates(live, capsys):
    a, b = live.twins
    assert a[:4] == b[:4] and a != b
    for argv in (["pin", a[:4], "--socket", live.socket], ["--socket", live.socket, "delete", b[:4]]):
        code = kvctl_main(argv)
        err = capsys.readouterr().err
        assert code == 2 and "ambiguous" in err and a in err and b in err, err
    with live.client() as c:  # nothing was deleted
        assert {a, b} <= {e.hash for e in c.entries(limit=1000).entries}


def _kvctl(*args: str) -> list[str]:
    return [sys.executable, "-m", "kvd.cli.kvctl", *args]


def test_output_piped_into_head_ends_quietly(live):
    """``kvctl ls | head`` ended in a BrokenPipeError traceback."""
    cmd = " ".join(_kvctl("ls", "--socket", live.socket, "--limit", "0")) + " | head -n 3"
    r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=60)
    assert len(r.stdout.splitlines()) == 3 and r.stderr == "", r.stderr
    assert r.returncode in (0, 128 + signal.SIGPIPE)


def test_reader_gone_before_the_first_line_exits_141_without_a_traceback(live):
    """The deterministic case: stdout's reader is closed before kvctl writes anything."""
    r, w = os.pipe()
    os.close(r)
    proc = subprocess.Popen(_kvctl("--socket", live.socket, "stats"), stdout=w, stderr=subprocess.PIPE, text=True)
    os.close(w)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGPIPE and err == "", err
