"""Run a command under the shipped unit's system-call filter and W^X rule, without systemd.

``python -m tests.daemon.sandbox ALLOWED_FILE -- CMD...``: sets no-new-privileges, refuses memory that
becomes executable after being writable (``prctl(PR_SET_MDWE)``, what ``MemoryDenyWriteExecute=``
does), loads a seccomp filter that answers EPERM to every system call not in ALLOWED_FILE (one name
a line; ``SystemCallErrorNumber=EPERM``, native architecture only), then execs CMD. The allowed set
is computed by ``allowed_syscalls`` from ``systemd-analyze syscall-filter``, as systemd computes it
from the unit's ``SystemCallFilter=`` lines: the first list allows, a ``~`` list takes away.
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys

PR_SET_NO_NEW_PRIVS = 38
PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1
SCMP_ACT_ALLOW = 0x7FFF0000


def _group(analyze: str, name: str, seen: set[str]) -> set[str]:
    out = subprocess.run([analyze, "syscall-filter", name], capture_output=True, text=True, check=True).stdout
    calls: set[str] = set()
    for line in out.splitlines()[1:]:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        if item.startswith("@"):
            if item not in seen:
                seen.add(item)
                calls |= _group(analyze, item, seen)
        else:
            calls.add(item)
    return calls


def allowed_syscalls(analyze: str, filters: list[str]) -> set[str]:
    """The set systemd allows for ``SystemCallFilter=`` lines (``filters``, in unit order)."""
    allowed: set[str] | None = None
    for line in filters:
        deny = line.startswith("~")
        names: set[str] = set()
        for item in line.lstrip("~").split():
            names |= _group(analyze, item, set()) if item.startswith("@") else {item}
        if deny:
            allowed = (allowed or set()) - names
        else:
            allowed = (allowed or set()) | names
    return allowed or set()


def _enter(allowed: list[str]) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_MDWE (kernel >= 6.3)")
    seccomp = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    seccomp.seccomp_init.restype = ctypes.c_void_p
    seccomp.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    ctx = seccomp.seccomp_init(0x00050000 | errno.EPERM)  # SCMP_ACT_ERRNO(EPERM)
    for name in allowed:
        nr = seccomp.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:  # not a system call of this architecture
            continue
        rc = seccomp.seccomp_rule_add(ctypes.c_void_p(ctx), SCMP_ACT_ALLOW, nr, 0)
        if rc != 0:
            raise OSError(-rc, f"seccomp_rule_add {name}")
    rc = seccomp.seccomp_load(ctypes.c_void_p(ctx))
    if rc != 0:
        raise OSError(-rc, "seccomp_load")


if __name__ == "__main__":
    sep = sys.argv.index("--")
    names = open(sys.argv[1]).read().split()
    _enter(names)
    cmd = sys.argv[sep + 1:]
    os.execv(cmd[0], cmd)
