"""kvctl's commands: one function per command, ``(client, args) -> exit code``.

Each asks the daemon through ``kvd.client.client`` (the only way kvctl reaches it), prints a table or
``--json``, and raises ``Failure`` with a reason for anything the user must fix. ``files`` and
``profile`` run without a daemon.
"""

from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path

from kvd.cli import progress
from kvd.cli.output import Failure, abbrev_len, emit, size, table
from kvd.cli.resolve import resolve_entries, resolve_model
from kvd.client.client import KvdClient
from kvd.core import protocol as P

LS_MAX = 1_000_000  # the daemon's largest listing; --limit 0 asks for that


def cmd_status(c: KvdClient, args: argparse.Namespace) -> int:
    h = c.health()
    s = c.stats()
    tiers = ", ".join(f"{t.name} {size(t.used_bytes)}/{size(t.capacity_bytes)}" for t in s.tiers)
    human = (f"kvd {h.version} (api {h.api}) {h.status}, up {h.uptime_s:.0f} s, socket {c.socket_path}\n"
             f"models {s.num_models}, entries {s.num_entries}, leases {s.leases_held}, tiers: {tiers}")
    emit(args.json, {"health": h.model_dump(), "stats": s.model_dump(), "socket": c.socket_path}, human)
    return 0


def cmd_models(c: KvdClient, args: argparse.Namespace) -> int:
    r = c.models()
    n = abbrev_len(m.fingerprint for m in r.models)
    rows = [(m.fingerprint[:n], m.model_id, f"{m.num_layers}x{m.num_kv_heads}x{m.head_dim}", m.kv_dtype,
             f"{m.num_global_heads} ({m.head_map_method})", m.num_entries,
             " ".join(f"{t}:{size(b)}" for t, b in m.bytes_by_tier.items()) or "-") for m in r.models]
    emit(args.json, r, table(rows, ["FINGERPRINT", "MODEL", "LxHxD", "DTYPE", "GLOBAL HEADS", "ENTRIES", "BYTES"]))
    return 0


def cmd_ls(c: KvdClient, args: argparse.Namespace) -> int:
    if args.limit < 0:
        raise Failure(f"--limit {args.limit}: give a positive number of entries, or 0 for all", code=2)
    limit = args.limit or LS_MAX
    r = c.entries(model=resolve_model(c, args.model), namespace=args.namespace, tier=args.tier, limit=limit)
    nh, nf = abbrev_len(e.hash for e in r.entries), abbrev_len(e.fingerprint for e in r.entries)
    rows = [(e.hash[:nh], e.namespace, e.fingerprint[:nf], e.kind, e.num_tokens, ",".join(e.tiers),
             size(e.nbytes), "yes" if e.pinned else "", e.leases, e.reuse_count, f"{e.idle_s:.0f}s")
            for e in r.entries]
    human = table(rows, ["HASH", "NAMESPACE", "MODEL", "KIND", "TOKENS", "TIERS", "BYTES", "PINNED", "LEASES",
                         "REUSES", "IDLE"])
    if r.truncated:
        human += f"\n(first {limit} shown; raise --limit, or 0 for all)"
    emit(args.json, r, human)
    return 0


def cmd_stats(c: KvdClient, args: argparse.Namespace) -> int:
    s = c.stats()
    rows = [(t.name, size(t.used_bytes), size(t.capacity_bytes),
             f"{100 * t.used_bytes / t.capacity_bytes:.1f}%" if t.capacity_bytes else "-", t.num_records)
            for t in s.tiers]
    hit = sum(s.hit_tokens_by_tier.values())
    rate = f"{hit / s.lookup_tokens:.1%}" if s.lookup_tokens else "-"
    lines = [table(rows, ["TIER", "USED", "CAPACITY", "USE", "RECORDS"]), "",
             f"lookups: {s.lookup_tokens} tokens asked, {hit} found ({rate}); by tier: "
             + (", ".join(f"{t} {n}" for t, n in s.hit_tokens_by_tier.items()) or "-")
             + f"; {s.counters.get('kvd_local_lookups_total', 0):.0f} answered by clients from the shared index",
             f"entries {s.num_entries}, models {s.num_models}, leases held {s.leases_held}, "
             f"reservations open {s.reservations_open}, up {s.uptime_s:.0f} s"]
    if s.counters:
        lines += ["", table(sorted((k, f"{v:.4g}") for k, v in s.counters.items()), ["COUNTER", "VALUE"])]
    emit(args.json, s, "\n".join(lines))
    return 0


def cmd_entries(c: KvdClient, args: argparse.Namespace) -> int:
    """pin, unpin, delete: each hash (or unique prefix) names one entry, in any namespace."""
    groups = resolve_entries(c, args.hashes, namespace=args.namespace, fingerprint=resolve_model(c, args.model))
    call = {"pin": c.pin, "unpin": c.unpin, "delete": c.delete}[args.cmd]
    done = sum(call(P.EntriesRequest(namespace=ns, fingerprint=fp, hashes=hs)).count
               for (ns, fp), hs in groups.items())
    asked = sum(len(hs) for hs in groups.values())
    verb = {"pin": "pinned", "unpin": "unpinned", "delete": "deleted"}[args.cmd]
    emit(args.json, {"count": done, "asked": asked}, f"{verb} {done} of {asked} entries")
    if done < asked:  # listed a moment ago, gone now (evicted or deleted in between)
        raise Failure(f"{asked - done} of the entries named left the daemon before they could be {verb}")
    return 0


def cmd_evict(c: KvdClient, args: argparse.Namespace) -> int:
    r = c.evict(P.EvictRequest(tier=args.tier, namespace=args.namespace, fingerprint=resolve_model(c, args.model),
                               max_bytes=args.max_bytes, dry_run=args.dry_run))
    verb = "would evict" if r.dry_run else "evicted"
    emit(args.json, r, f"{verb} {r.count} entries ({size(r.nbytes)}) from {args.tier}")
    return 0


def cmd_flush(c: KvdClient, args: argparse.Namespace) -> int:
    done, asked, nbytes = progress.flush(c, args.namespace, resolve_model(c, args.model), _bars(args))
    emit(args.json, {"count": done, "asked": asked, "nbytes": nbytes},
         f"flushed {done} of {asked} host-only entries ({size(nbytes)}) to ssd")
    return 0


def cmd_compact(c: KvdClient, args: argparse.Namespace) -> int:
    reclaimed = progress.compact(c, _bars(args))
    emit(args.json, {"reclaimed_bytes": reclaimed}, f"compacted the ssd tier ({size(reclaimed)} reclaimed)")
    return 0


def cmd_config(c: KvdClient, args: argparse.Namespace) -> int:
    cfg = c.config()
    lines = []
    for section, values in cfg.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
        lines.append("")
    emit(args.json, cfg, "\n".join(lines).rstrip())
    return 0


def _bars(args: argparse.Namespace) -> str:
    return "never" if args.json and args.progress == "auto" else args.progress


# ---- without a daemon ---------------------------------------------------------------------------

SHIPPED = {  # name -> path inside the installed package
    "unit": "data/kvd.service",
    "heads": "data/heads",
    "config": "defaults.toml",
}


def shipped_path(name: str) -> Path:
    """Where the installed package keeps a shipped file (a plain file on disk: wheels are unpacked)."""
    return Path(str(resources.files("kvd").joinpath(SHIPPED[name])))


def cmd_files(args: argparse.Namespace) -> int:
    """Paths of the files shipped in the package: the systemd unit, the head maps, the defaults."""
    names = [args.name] if args.name else list(SHIPPED)
    paths = {n: shipped_path(n) for n in names}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise Failure(f"the installed package lacks {', '.join(missing)}; reinstall kvd-cache")
    if args.name:
        emit(args.json, {args.name: str(paths[args.name])}, str(paths[args.name]))
    else:
        emit(args.json, {n: str(p) for n, p in paths.items()}, table(list(paths.items()), ["FILE", "PATH"]))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    """Profile a model's KV heads into a head map: runs here, no daemon; needs the [profile] extra."""
    if not (Path(args.model_dir) / "config.json").is_file():
        raise Failure(f"{args.model_dir} is not a model directory (no config.json); pass a local transformers "
                      "model dir (python -m kvd.testing.models fetch smollm2 makes one)", code=2)
    try:
        from kvd.calibrate.profiler import main as profile_main
    except ImportError as e:
        raise Failure(f"kvctl profile needs {e.name}: pip install 'kvd-cache[profile]'") from None
    return profile_main([args.model_dir, "--out", args.out, "--progress", _bars(args), *args.extra])
