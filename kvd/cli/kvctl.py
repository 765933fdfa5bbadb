"""kvctl: operate a running kvd from the shell.

Talks to the daemon through ``kvd.client.client`` only. Human tables by default, ``--json`` for
scripts. Exit codes: 0 ok, 1 the operation failed (daemon unreachable, error answer), 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from kvd.client.client import KvdClient
from kvd.core import protocol as P
from kvd.core.errors import KvdError


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _out(args: argparse.Namespace, model: Any, human: str) -> None:
    if args.json:
        doc = model.model_dump(mode="json") if hasattr(model, "model_dump") else model
        print(json.dumps(doc, indent=1))
    else:
        print(human)


# ---- commands -----------------------------------------------------------------------------------


def cmd_status(c: KvdClient, args: argparse.Namespace) -> int:
    h = c.health()
    s = c.stats()
    tiers = ", ".join(f"{t.name} {_size(t.used_bytes)}/{_size(t.capacity_bytes)}" for t in s.tiers)
    human = (f"kvd {h.version} (api {h.api}) {h.status}, up {h.uptime_s:.0f} s, socket {c.socket_path}\n"
             f"models {s.num_models}, entries {s.num_entries}, leases {s.leases_held}, tiers: {tiers}")
    _out(args, {"health": h.model_dump(), "stats": s.model_dump()}, human)
    return 0


def cmd_models(c: KvdClient, args: argparse.Namespace) -> int:
    r = c.models()
    rows = [(m.fingerprint[:12], m.model_id, f"{m.num_layers}x{m.num_kv_heads}x{m.head_dim}", m.kv_dtype,
             f"{m.num_global_heads} ({m.head_map_method})", m.num_entries,
             " ".join(f"{t}:{_size(b)}" for t, b in m.bytes_by_tier.items()) or "-") for m in r.models]
    _out(args, r, table(rows, ["FINGERPRINT", "MODEL", "LxHxD", "DTYPE", "GLOBAL HEADS", "ENTRIES", "BYTES"]))
    return 0


def cmd_ls(c: KvdClient, args: argparse.Namespace) -> int:
    r = c.entries(model=args.model, namespace=args.namespace, tier=args.tier, limit=args.limit)
    rows = [(e.hash[:16], e.namespace, e.fingerprint[:12], e.kind, e.num_tokens, ",".join(e.tiers),
             _size(e.nbytes), "yes" if e.pinned else "", e.leases, e.reuse_count, f"{e.idle_s:.0f}s")
            for e in r.entries]
    human = table(rows, ["HASH", "NAMESPACE", "MODEL", "KIND", "TOKENS", "TIERS", "BYTES", "PINNED", "LEASES",
                         "REUSES", "IDLE"])
    if r.truncated:
        human += f"\n(first {args.limit} shown; raise --limit)"
    _out(args, r, human)
    return 0


def cmd_stats(c: KvdClient, args: argparse.Namespace) -> int:
    s = c.stats()
    rows = [(t.name, _size(t.used_bytes), _size(t.capacity_bytes),
             f"{100 * t.used_bytes / t.capacity_bytes:.1f}%" if t.capacity_bytes else "-", t.num_records)
            for t in s.tiers]
    hit = sum(s.hit_tokens_by_tier.values())
    rate = f"{hit / s.lookup_tokens:.1%}" if s.lookup_tokens else "-"
    lines = [table(rows, ["TIER", "USED", "CAPACITY", "USE", "RECORDS"]), "",
             f"lookups: {s.lookup_tokens} tokens asked, {hit} found ({rate}); by tier: "
             + (", ".join(f"{t} {n}" for t, n in s.hit_tokens_by_tier.items()) or "-"),
             f"entries {s.num_entries}, models {s.num_models}, leases held {s.leases_held}, "
             f"reservations open {s.reservations_open}, up {s.uptime_s:.0f} s"]
    if s.counters:
        lines += ["", table(sorted((k, f"{v:.4g}") for k, v in s.counters.items()), ["COUNTER", "VALUE"])]
    _out(args, s, "\n".join(lines))
    return 0


def _entries_req(args: argparse.Namespace) -> P.EntriesRequest:
    return P.EntriesRequest(namespace=args.namespace or "default", fingerprint=args.model, hashes=args.hashes)


def cmd_pin(c: KvdClient, args: argparse.Namespace) -> int:
    r = (c.pin if args.cmd == "pin" else c.unpin)(_entries_req(args))
    _out(args, r, f"{args.cmd}ned {r.count} of {len(args.hashes)} entries")
    return 0 if r.count == len(args.hashes) else 1


def cmd_delete(c: KvdClient, args: argparse.Namespace) -> int:
    r = c.delete(_entries_req(args))
    _out(args, r, f"deleted {r.count} of {len(args.hashes)} entries")
    return 0


def cmd_evict(c: KvdClient, args: argparse.Namespace) -> int:
    r = c.evict(P.EvictRequest(tier=args.tier, namespace=args.namespace, fingerprint=args.model,
                               max_bytes=args.max_bytes, dry_run=args.dry_run))
    verb = "would evict" if r.dry_run else "evicted"
    _out(args, r, f"{verb} {r.count} entries ({_size(r.nbytes)}) from {args.tier}")
    return 0


def cmd_flush(c: KvdClient, args: argparse.Namespace) -> int:
    from kvd.cli.progress import flush_with_progress

    r = flush_with_progress(c, P.FlushRequest(namespace=args.namespace, fingerprint=args.model),
                            quiet=args.json)
    _out(args, r, f"flushed {r.count} entries to ssd")
    return 0


def cmd_compact(c: KvdClient, args: argparse.Namespace) -> int:
    r = c.compact()
    _out(args, r, f"compacted the ssd tier ({_size(r.count)} reclaimed)")
    return 0


def cmd_config(c: KvdClient, args: argparse.Namespace) -> int:
    cfg = c.config()
    lines = []
    for section, values in cfg.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
        lines.append("")
    _out(args, cfg, "\n".join(lines).rstrip())
    return 0


def cmd_profile(c: KvdClient | None, args: argparse.Namespace) -> int:
    from pathlib import Path

    from kvd.calibrate.profiler import main as profile_main

    if not (Path(args.model_dir) / "config.json").is_file():
        print(f"kvctl: {args.model_dir} is not a model directory (no config.json); pass a local "
              "transformers model dir (python -m kvd.testing.models fetch smollm2 makes one)", file=sys.stderr)
        return 2
    return profile_main([args.model_dir, "--out", args.out, *args.extra])  # runs locally, no daemon


COMMANDS = {"status": cmd_status, "models": cmd_models, "ls": cmd_ls, "stats": cmd_stats, "pin": cmd_pin,
            "unpin": cmd_pin, "delete": cmd_delete, "evict": cmd_evict, "flush": cmd_flush,
            "compact": cmd_compact, "config": cmd_config, "profile": cmd_profile}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvctl", description="Operate a running kvd daemon.")
    p.add_argument("--socket", metavar="PATH", help="control socket (default: the daemon's default path)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for an answer")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    sub.add_parser("status", help="is the daemon up; usage summary")
    sub.add_parser("models", help="registered models")
    ls = sub.add_parser("ls", help="list entries")
    ls.add_argument("--model", metavar="FINGERPRINT")
    ls.add_argument("--namespace")
    ls.add_argument("--tier", choices=["host", "ssd", "remote"])
    ls.add_argument("--limit", type=int, default=100)
    sub.add_parser("stats", help="per-tier usage, hit rates, counters")
    for name, helptext in (("pin", "never evict these entries"), ("unpin", "make entries evictable again"),
                           ("delete", "remove entries from every tier")):
        q = sub.add_parser(name, help=helptext)
        q.add_argument("hashes", nargs="+", metavar="HASH")
        q.add_argument("--namespace", default="default")
        q.add_argument("--model", metavar="FINGERPRINT")
    ev = sub.add_parser("evict", help="evict unpinned, unleased entries from a tier")
    ev.add_argument("--tier", choices=["host", "ssd", "remote"], default="host")
    ev.add_argument("--namespace")
    ev.add_argument("--model", metavar="FINGERPRINT")
    ev.add_argument("--max-bytes", type=int, help="evict in the tier's policy order until this many bytes are freed")
    ev.add_argument("--dry-run", action="store_true", help="say what would be evicted; change nothing")
    fl = sub.add_parser("flush", help="write host-tier entries to SSD now")
    fl.add_argument("--namespace")
    fl.add_argument("--model", metavar="FINGERPRINT")
    sub.add_parser("compact", help="compact the SSD tier's LMDB file")
    cfg = sub.add_parser("config", help="configuration")
    cfg.add_argument("action", choices=["show"])
    pr = sub.add_parser("profile", help="profile a model's KV heads into a head map (runs locally; further "
                        "options go to the profiler: kvctl profile DIR --out F --help-profiler)")
    pr.add_argument("model_dir")
    pr.add_argument("--out", required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args, extra = parser().parse_known_args(argv)
        if extra and args.cmd != "profile":
            parser().error(f"unrecognized arguments: {' '.join(extra)}")
        args.extra = [("--help" if x == "--help-profiler" else x) for x in extra]
    except SystemExit as e:  # argparse: 2 on usage errors, 0 for --help
        return int(e.code or 0)
    if args.cmd == "profile":
        return cmd_profile(None, args)
    client = KvdClient(args.socket, timeout_s=args.timeout, register_cuda=False)
    try:
        return COMMANDS[args.cmd](client, args)
    except ValidationError as e:  # bad arguments caught by the request models: a usage error
        print(f"kvctl: {P.describe_validation_error(e)}", file=sys.stderr)
        return 2
    except KvdError as e:
        print(f"kvctl: {e}", file=sys.stderr)
        return 1
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
