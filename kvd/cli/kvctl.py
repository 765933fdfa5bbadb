"""kvctl: operate a running kvd from the shell.

Talks to the daemon through ``kvd.client.client`` only. Human tables by default, ``--json`` for
scripts. Global flags (``--socket``, ``--config``, ``--json``, ``--timeout``, ``--progress``) go before or
after the command: both ``kvctl --json status`` and ``kvctl status --json`` work (argparse parents).
The socket comes from ``--socket``, ``$KVD_SOCKET`` or the daemon's configuration (``kvd.cli.target``).

Exit codes: 0 ok; 1 the operation failed (daemon unreachable, error answer, nothing matched); 2 usage
error (bad flag, bad or ambiguous hash); 141 stdout closed early (``kvctl ls | head``), silently, as a
process killed by SIGPIPE would be.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from pydantic import ValidationError

from kvd import __version__
from kvd.cli import commands as cmd
from kvd.cli.output import Failure, fail
from kvd.cli.target import find_socket
from kvd.client.client import KvdClient
from kvd.core import protocol as P
from kvd.core.errors import ConfigError, DaemonUnavailable, KvdError
from kvd.core.units import parse_size

TIERS = ["gpu", "host", "ssd", "remote"]
EXIT_SIGPIPE = 128 + 13

DAEMON_COMMANDS = {"status": cmd.cmd_status, "models": cmd.cmd_models, "ls": cmd.cmd_ls, "stats": cmd.cmd_stats,
                   "pin": cmd.cmd_entries, "unpin": cmd.cmd_entries, "delete": cmd.cmd_entries,
                   "evict": cmd.cmd_evict, "flush": cmd.cmd_flush, "compact": cmd.cmd_compact,
                   "config": cmd.cmd_config}


def _seconds(text: str) -> float:
    """``--timeout``: a positive, finite number of seconds (a socket takes no other; it raised before)."""
    try:
        s = float(text)
    except ValueError:
        s = math.nan
    if not 0 < s < 1e6:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds between 0 and 1e6 (e.g. 10)")
    return s


def _size(text: str) -> int:
    """``--max-bytes``: a size as the settings spell it (``4096``, ``512M``, ``2GiB``: kvd.core.units)."""
    try:
        return int(parse_size(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _global_flags(p: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The flags every command takes. On the subcommands they default to SUPPRESS, so a flag given
    before the command is not reset by the subcommand's parser."""
    d = (lambda v: v) if defaults else (lambda v: argparse.SUPPRESS)
    p.add_argument("--socket", metavar="PATH", default=d(None),
                   help="control socket (default: $KVD_SOCKET, else the daemon's config, else its default path)")
    p.add_argument("--config", metavar="FILE", default=d(None),
                   help="the daemon's config file, to find its socket (default: $KVD_CONFIG or /etc/kvd/kvd.toml)")
    p.add_argument("--json", action="store_true", default=d(False), help="machine-readable output")
    p.add_argument("--timeout", type=_seconds, default=d(10.0), metavar="S", help="seconds to wait for an answer")
    p.add_argument("--progress", choices=["auto", "always", "never"], default=d("auto"),
                   help="progress bars on stderr (auto: on a terminal)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvctl", description="Operate a running kvd daemon.")
    _global_flags(p, defaults=True)
    p.add_argument("--version", action="version", version=f"kvctl {__version__} (kvd-cache)")
    common = argparse.ArgumentParser(add_help=False)
    _global_flags(common, defaults=False)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, parents=[common], description=help_text)

    add("status", "is the daemon up; usage summary")
    add("models", "registered models")
    ls = add("ls", "list entries")
    ls.add_argument("--model", metavar="FP", help="fingerprint, unique prefix of one, or model id")
    ls.add_argument("--namespace")
    ls.add_argument("--tier", choices=TIERS)
    ls.add_argument("--limit", type=int, default=100, help="entries shown (0: all)")
    add("stats", "per-tier usage, hit rates, counters")
    for name, help_text in (("pin", "never evict these entries"), ("unpin", "make entries evictable again"),
                            ("delete", "remove entries from every tier")):
        q = add(name, help_text)
        q.add_argument("hashes", nargs="+", metavar="HASH", help="entry hash or a unique prefix (>= 4 hex)")
        q.add_argument("--namespace", help="only entries of this namespace (default: any)")
        q.add_argument("--model", metavar="FP", help="only entries of this model")
    ev = add("evict", "evict unpinned, unleased entries from a tier")
    ev.add_argument("--tier", choices=TIERS, default="host")
    ev.add_argument("--namespace")
    ev.add_argument("--model", metavar="FP")
    ev.add_argument("--max-bytes", type=_size, metavar="SIZE",
                    help="evict in the tier's policy order until this much is freed (bytes, or 512M, 2GiB, ...)")
    ev.add_argument("--dry-run", action="store_true", help="say what would be evicted; change nothing")
    fl = add("flush", "write host-tier entries to SSD now")
    fl.add_argument("--namespace")
    fl.add_argument("--model", metavar="FP")
    add("compact", "compact the SSD tier's LMDB file")
    add("config", "the running configuration").add_argument("action", choices=["show"])
    fi = add("files", "paths of the files shipped with kvd (systemd unit, head maps, defaults)")
    fi.add_argument("name", nargs="?", choices=sorted(cmd.SHIPPED))
    pr = add("profile", "profile a model's KV heads into a head map (runs locally; further options go to the "
             "profiler: kvctl profile DIR --out F --help-profiler)")
    pr.add_argument("model_dir")
    pr.add_argument("--out", required=True)
    return p


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = parser()
    args, extra = p.parse_known_args(argv)
    if extra and args.cmd != "profile":
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = [("--help" if x == "--help-profiler" else x) for x in extra]
    return args


def _run(args: argparse.Namespace) -> int:
    if args.cmd == "files":
        return cmd.cmd_files(args)
    if args.cmd == "profile":
        return cmd.cmd_profile(args)
    target = find_socket(args.socket, args.config)
    client = KvdClient(target.socket, timeout_s=args.timeout, register_cuda=False)
    try:
        return DAEMON_COMMANDS[args.cmd](client, args)
    except DaemonUnavailable as e:
        raise Failure(f"{e} [socket from {target.source}; another one: --socket PATH or KVD_SOCKET]") from None
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parse(argv)
    except SystemExit as e:  # argparse: 2 on usage errors, 0 for --help and --version
        return int(e.code or 0)
    try:
        code = _run(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        # The reader (head, less) went away: say nothing more, and keep Python's exit-time flush of
        # stdout from raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_SIGPIPE
    except Failure as e:
        fail(str(e))
        return e.code
    except ValidationError as e:  # bad arguments caught by the request models: a usage error
        fail(P.describe_validation_error(e))
        return 2
    except ConfigError as e:
        fail(str(e))
        return 2
    except KvdError as e:
        fail(f"{args.cmd}: {e}")
        return 1
    except KeyboardInterrupt:
        fail("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
