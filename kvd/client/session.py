"""An engine process's session with the daemon: registration, failure handling, circuit breaker.

kvd is a best-effort cache, so an engine adapter never lets a daemon fault fail a request. Every call
it makes goes through one ``DaemonSession``. Lifecycle: created unregistered → ``handle()`` registers
the model on first use (and again after a failure) → ``call(what, fn)`` runs ``fn(handle)`` and turns
any daemon failure into ``None``: an unreachable or hung daemon (``DaemonUnavailable``) opens the
circuit breaker, so for ``retry_interval_s`` (doubling up to ``max_retry_interval_s``) no call is
attempted and a dead daemon costs one bounded timeout per interval, not one per request; a refusal
(any other ``KvdError``) is counted and logged. A success closes the breaker. ``counters`` counts
failures, refusals and skipped calls by name (engine adapters add their own).

Nothing here raises to the engine except ``ConfigError`` from ``require_compatible`` at start-up, for
set-ups that can never work. Engine-specific settings stay with the adapter
(``kvd.connectors.vllm.settings``); this module imports no engine.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import TypeVar

from kvd.client.client import KvdClient
from kvd.client.handle import ModelHandle
from kvd.client.prefix import register
from kvd.core.errors import ConfigError, DaemonUnavailable, KvdError
from kvd.core.headmap import HeadMap
from kvd.core.keys import ModelSpec

logger = logging.getLogger(__name__)

T = TypeVar("T")


class DaemonSession:
    """One engine role's connection to the daemon: registration, circuit breaker and counters.

    ``block_tokens``: the engine's KV block size; the daemon's ``chunk_tokens`` must be a multiple of
    it (else the session disables itself and ``require_compatible`` says what to change).
    """

    def __init__(self, client: KvdClient, spec: ModelSpec, head_map: HeadMap | None, *,
                 namespace: str = "default", role: str = "engine", block_tokens: int = 1,
                 retry_interval_s: float = 1.0, max_retry_interval_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.spec = spec
        self.head_map = head_map
        self.namespace = namespace
        self.role = role
        self.block_tokens = block_tokens
        self.retry_interval_s = retry_interval_s
        self.max_retry_interval_s = max_retry_interval_s
        self.clock = clock
        self.counters: Counter[str] = Counter()
        self._handle: ModelHandle | None = None
        self._closed_until = 0.0  # breaker: no call before this time
        self._backoff_s = retry_interval_s
        self.disabled_reason: str | None = None

    # ---- breaker ----------------------------------------------------------------------------------

    def is_open(self) -> bool:
        return self.disabled_reason is not None or self.clock() < self._closed_until

    def _trip(self, what: str, e: Exception) -> None:
        self.counters["daemon_failures"] += 1
        level = logging.WARNING if self._backoff_s == self.retry_interval_s else logging.DEBUG
        logger.log(level, "kvd %s failed (%s); serving without it, next try in %.1f s", what, e, self._backoff_s)
        self._closed_until = self.clock() + self._backoff_s
        self._backoff_s = min(self._backoff_s * 2, self.max_retry_interval_s)

    def _ok(self) -> None:
        if self._backoff_s != self.retry_interval_s:
            logger.info("kvd is reachable again (%s)", self.role)
        self._backoff_s = self.retry_interval_s

    # ---- registration and calls ------------------------------------------------------------------

    def handle(self) -> ModelHandle | None:
        """The registered model, registering first if needed; ``None`` while the breaker is open."""
        if self._handle is not None:
            return self._handle
        if self.is_open():
            return None
        try:
            h = register(self.client, self.spec, self.head_map, namespace=self.namespace)
        except KvdError as e:
            self._trip("registration", e)
            return None
        if h.chunk_tokens % self.block_tokens:
            self.disabled_reason = (
                f"the daemon's chunk_tokens={h.chunk_tokens} is not a multiple of the engine's block size "
                f"({self.block_tokens} tokens); set KVD_KEYS__CHUNK_TOKENS to a multiple (e.g. "
                f"{max(1, h.chunk_tokens // self.block_tokens) * self.block_tokens}) or change the block size")
            return None
        self._handle = h
        self._ok()
        logger.info("kvd %s registered %s (fingerprint %s, chunk %d tokens)", self.role, self.spec.model_id,
                    h.fingerprint, h.chunk_tokens)
        return h

    def require_compatible(self) -> None:
        """At start-up: register if the daemon is up; raise ``ConfigError`` if it can never work."""
        self.handle()
        if self.disabled_reason is not None:
            raise ConfigError(self.disabled_reason)
        if self._handle is None:
            logger.warning("kvd is not reachable at %s; serving without it and retrying", self.client.socket_path)

    def call(self, what: str, fn: Callable[[ModelHandle], T]) -> T | None:
        """``fn(handle)``, or ``None`` if the daemon is unavailable or refuses (counted, logged)."""
        h = self.handle()
        if h is None or self.is_open():
            self.counters[f"{what}_skipped"] += 1
            return None
        try:
            out = fn(h)
        except DaemonUnavailable as e:
            self._trip(what, e)
            return None
        except KvdError as e:  # the daemon refused: bad state, not a programming error here
            self.counters[f"{what}_refused"] += 1
            logger.warning("kvd refused %s: %s", what, e)
            return None
        self._ok()
        return out

    def close(self) -> None:
        self.client.close()
