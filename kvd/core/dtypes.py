"""The one table of KV dtypes kvd handles: names (torch's), sizes, ids in stored formats, numpy views.

Every module that sizes, encodes or views KV bytes reads this table; nothing keeps its own copy.
numpy has no bfloat16 and no fp8, so those are viewed as same-size unsigned integers in numpy
(``NUMPY_VIEW``) and as their real dtype in torch (``getattr(torch, name)``).
"""

from __future__ import annotations

from typing import Any

from kvd.core.errors import InvalidRequest

# name -> bytes per element
DTYPE_BYTES: dict[str, int] = {"bfloat16": 2, "float16": 2, "float32": 4, "float8_e4m3fn": 1}
# name -> id in the codec payload and SSD record headers (never reuse a retired id)
DTYPE_IDS: dict[str, int] = {"bfloat16": 1, "float16": 2, "float32": 3, "float8_e4m3fn": 4}
DTYPE_NAMES: dict[int, str] = {v: k for k, v in DTYPE_IDS.items()}
# name -> numpy dtype string of the same size (bf16 and fp8 shown as raw integers)
NUMPY_VIEW: dict[str, str] = {"bfloat16": "<u2", "float16": "<f2", "float32": "<f4", "float8_e4m3fn": "u1"}


def kv_dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` / ``"bfloat16"`` -> ``"bfloat16"``; ``InvalidRequest`` naming the supported ones."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise InvalidRequest(f"KV dtype {name!r} is not supported by kvd; use one of {sorted(DTYPE_BYTES)}")
    return name
