"""How settings spell sizes, listen addresses and file modes (config files, ``KVD_*`` variables, flags).

**Sizes** — a plain number is bytes. A suffix multiplies, case-insensitively:

| suffix | factor | as in |
| --- | --- | --- |
| ``K``, ``M``, ``G``, ``T``, ``P`` | 1024, 1024², ... (binary) | systemd (``MemoryMax=16G``), Docker (``--shm-size 16g``) |
| ``KiB``, ``MiB``, ``GiB``, ... and ``Ki``, ``Mi``, ``Gi``, ... | binary | IEC, Kubernetes (``16Gi``) |
| ``KB``, ``MB``, ``GB``, ... | 1000, 1000², ... (decimal) | SI, disk vendors |
| ``B`` | 1 | |

So ``16G`` and ``16GiB`` are both 17,179,869,184 bytes and ``16GB`` is 16,000,000,000: the bare letter
means what it means to systemd and Docker, the tools that size the memory kvd runs in. Fractions are
allowed where the result is whole bytes' worth (``1.5GiB``).

**Addresses** — ``HOST:PORT``; ``:PORT`` listens on every interface (as Prometheus exporters spell
it); an IPv6 host goes in brackets (``[::1]:9464``).

**File modes** — octal, written ``"0660"``, ``"660"`` or ``"0o660"``, or as a TOML octal integer
``0o660``; kept as four octal digits (``"0660"``).
"""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_POWERS = {"k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def _factor(unit: str) -> int | None:
    u = unit.lower()
    if u in ("", "b"):
        return 1
    if u[0] not in _POWERS:
        return None
    power = _POWERS[u[0]]
    if u[1:] in ("", "i", "ib"):
        return 1024**power
    if u[1:] == "b":
        return 1000**power
    return None


def parse_size(value: object) -> object:
    """Bytes from ``"16G"``, ``"512MiB"``, ``"2GB"``, ``"4096"``; anything not a string passes through
    unchanged (the field's own type checks it).

    >>> parse_size("16G") == parse_size("16GiB") == 16 << 30, parse_size("2GB")
    (True, 2000000000)
    """
    if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
        raise ValueError(f"{value} is negative: a size is a number of bytes, 0 or more")
    if not isinstance(value, str):
        return value
    m = _SIZE.match(value)
    factor = _factor(m.group(2)) if m else None
    if m is None or factor is None:
        raise ValueError(f"{value!r} is not a size: write bytes, or a number with K/M/G/T (x1024), "
                         "KiB/MiB/GiB/TiB (x1024) or KB/MB/GB/TB (x1000), e.g. 16GiB")
    n = float(m.group(1)) * factor if "." in m.group(1) else int(m.group(1)) * factor
    if n != int(n):
        raise ValueError(f"{value!r} is not a whole number of bytes")
    return int(n)


def parse_mode(value: object) -> str:
    """``"0660"`` from ``"0660"``, ``"660"``, ``"0o660"`` or the integer 0o660 (TOML's octal literal)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("must be an octal file mode such as '0660' or 0o660")
    if isinstance(value, int):
        mode = value
    else:
        digits = value.strip().lower().removeprefix("0o")
        if not digits or any(c not in "01234567" for c in digits):
            raise ValueError("must be an octal file mode such as '0660' or 0o660")
        mode = int(digits, 8)
    if not 0 <= mode <= 0o777:
        raise ValueError(f"{oct(mode)} is not a file mode between 0o000 and 0o777 (in TOML write 0o660 or \"0660\")")
    return f"{mode:04o}"


def check_listen_addr(value: str) -> str:
    """``HOST:PORT`` or ``:PORT`` (every interface); empty turns the listener off."""
    if value == "":
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("must be HOST:PORT (e.g. 127.0.0.1:9464), :PORT for every interface, "
                         "or empty to disable metrics")
    if host.startswith("[") != host.endswith("]") or (":" in host and not host.startswith("[")):
        raise ValueError("an IPv6 host goes in brackets, e.g. [::1]:9464")
    return value
