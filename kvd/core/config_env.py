"""The ``KVD_*`` environment: which variables are settings (``KVD_<SECTION>__<KEY>``), which belong to
other tools, and why any other one is refused (a misspelt variable stops the daemon instead of being
ignored). ``kvd.core.config`` merges what this returns between the file and the command line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, get_origin

from pydantic import BaseModel

from kvd.core.errors import ConfigError

ENV_PREFIX = "KVD_"
# KVD_* variables that are not settings, and who reads them.
OTHER_ENV = {
    "KVD_CONFIG": "the daemon's config file",
    "KVD_SOCKET": "kvctl's control socket",
    "KVD_MODEL_CACHE": "where tests and benchmarks keep the SmolLM2 model",
    "KVD_BENCH_LOG": "the control-plane benchmark's daemon log level",
}


def env_overrides(environ: Mapping[str, str], settings: type[BaseModel]
                  ) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """``KVD_HOST__CAPACITY_BYTES=2GiB`` -> ``{"host": {"capacity_bytes": "2GiB"}}``, plus sources.
    A ``KVD_*`` variable that is neither a setting nor in ``OTHER_ENV`` is a ``ConfigError``."""
    tree: dict[str, Any] = {}
    sources: dict[tuple[str, ...], str] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name in OTHER_ENV:
            continue
        if "__" not in name:
            raise ConfigError(_unknown_env(name, settings))
        path = tuple(p.lower() for p in name[len(ENV_PREFIX):].split("__"))
        if any(not p for p in path):
            raise ConfigError(f"environment variable {name}: empty section or key name")
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"environment variable {name}: {p} is a value, not a section")
        node[path[-1]] = _list(name, value) if get_origin(_annotation(settings, path)) is list else value
        sources[path] = f"environment variable {name}"
    return tree, sources


def _unknown_env(name: str, settings: type[BaseModel]) -> str:
    """Why ``name`` (a KVD_* variable without ``__``) is refused, with the setting it may have meant."""
    words = name[len(ENV_PREFIX):].lower()
    guess = next((f"{ENV_PREFIX}{section.upper()}__{words[len(section) + 1:].upper()}"
                  for section, field in settings.model_fields.items()
                  if words.startswith(section + "_") and isinstance(field.annotation, type)
                  and issubclass(field.annotation, BaseModel) and words[len(section) + 1:] in field.annotation.model_fields),
                 None)
    hint = f"did you mean {guess}? " if guess else ""
    others = ", ".join(f"{k} ({v})" for k, v in OTHER_ENV.items())
    return (f"environment variable {name} is not a kvd setting: {hint}settings are KVD_<SECTION>__<KEY>, with "
            f"two underscores between section and key (kvd --print-default-config lists them); the other "
            f"KVD_ variables are {others}. Unset it or correct its name")


def _annotation(settings: type[BaseModel], path: tuple[str, ...]) -> Any:
    """The type of the setting at ``path`` (None where there is none: validation names the key)."""
    model: Any = settings
    for p in path:
        field = model.model_fields.get(p) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        model = field.annotation
    return model


def _list(name: str, value: str) -> list[Any]:
    """A list setting from one variable: a JSON array (``["a:7000", "b:7000"]``, ``[0, 1001]``) or items
    separated by commas (``a:7000,b:7000``); each item is then validated as the setting's item type."""
    if value.lstrip().startswith("["):
        try:
            items = json.loads(value)
        except ValueError as e:
            raise ConfigError(f"environment variable {name}: {value!r} is not a JSON array ({e})") from None
        return items if isinstance(items, list) else [items]
    return [v.strip() for v in value.split(",") if v.strip()]
