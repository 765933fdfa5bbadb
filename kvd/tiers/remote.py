"""The remote tier: extent records in a Redis Cluster (or Valkey), shared by every kvd host.

Records are the record tiers' format (``kvd.tiers.record``: a checked header and a codec payload), so
every read is verified exactly as an SSD read is; a mismatch is a miss, counted, never served.

Keys (``<p>`` = ``remote.key_prefix``; ``<k>`` = the record key, ``name_key(ExtentName)``)::

    <p>:{<tag>}:r:<k>              one extent's record (and, for global heads with replicate_global,
    <p>:{<tag'>}:r:<k>             a second copy under another tag: another slot, usually another master)
    <p>:{<mtag>}:m:<ns>␟<fp>␟<hash>  the entry's manifest: a hash, head class -> facts of its record

The hash tag of a record is drawn from its extent's name, so an entry's extents (one per head class,
per head group) land on different slots and a load of a many-chunk prompt pulls from every master at
once. The manifest lets a host that never stored an entry find it: a lookup that misses locally asks
for the manifests of every missed chunk in one pipelined round trip (``find``).

kvd does not evict from the cluster: the cluster's own ``maxmemory-policy`` (allkeys-lru) decides, and
``remote.ttl_s`` may bound a record's life. A record the cluster dropped is a miss (``RecordMissing``).
kvd's index of what the cluster holds is a cache: filled by ``scan`` at start (up to
``remote.scan_limit`` entries) and by lookups.

Faults: every command has ``remote.timeout_s``. A failure (a node down, a failover in progress, a
timeout) opens a circuit breaker: for a back-off (0.5 s, doubling to 30 s) every call raises
``TierUnavailable`` at once, so a dead cluster costs a lookup nothing; the first call after it tries
again, and a success closes the breaker. Replicated global extents are read from the second copy when
the first one's node fails.

Threads: every method blocks on the network, on the store's I/O executor (redis-py's pool is thread-safe).
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from kvd.core.config import RemoteSettings
from kvd.core.errors import ConfigError, RecordMissing, TierUnavailable
from kvd.tiers.base import Buffer, ExtentName, Location, StoredRecord, Tier, TierStats
from kvd.tiers.record import name_key, parse_key, unpack_header
from kvd.tiers.resp import FastGet, FastGetUnavailable

logger = logging.getLogger(__name__)

MIN_BACKOFF_S, MAX_BACKOFF_S = 0.5, 30.0
SCAN_BATCH, MAX_GONE = 1000, 65536  # MAX_GONE: manifest fields of records found gone kept (oldest go first)


def connect(settings: RemoteSettings):
    """A ``redis.cluster.RedisCluster`` client for ``settings``; ``TierUnavailable`` if the cluster cannot
    be reached, ``ConfigError`` if it refuses the credentials or the settings are unusable."""
    import redis
    from redis.backoff import ExponentialBackoff
    from redis.cluster import ClusterNode, RedisCluster
    from redis.retry import Retry

    password = _password(settings)
    kw = dict(username=settings.username or None, password=password or None, socket_timeout=settings.timeout_s,
              socket_connect_timeout=settings.timeout_s, max_connections=settings.max_connections,
              require_full_coverage=False,
              # two quick retries at most (a moved slot, a failover): the breaker handles the rest
              retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), 2))
    if settings.tls:  # the host name too: redis-py 5 checks only the CA unless asked (ssl_check_hostname)
        kw.update(ssl=True, ssl_ca_certs=settings.tls_ca_file or None, ssl_check_hostname=True)
    nodes = [ClusterNode(n.rpartition(":")[0], int(n.rpartition(":")[2])) for n in settings.startup_nodes]
    try:
        client = RedisCluster(startup_nodes=nodes, **kw)
        client.ping(target_nodes=RedisCluster.PRIMARIES)
    except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError) as e:
        where = ", ".join(settings.startup_nodes)
        if isinstance(e, redis.exceptions.AuthenticationError) or any(
                w in str(e) for w in ("username-password", "WRONGPASS", "NOAUTH", "NOPERM")):
            raise ConfigError(f"the Redis cluster at {where} refused the credentials ({e}); check "
                              "remote.username / remote.password(_file) and the cluster's ACL") from None
        raise TierUnavailable(f"the Redis cluster at {where} cannot be reached ({e}); check "
                              "remote.startup_nodes, remote.tls and that the cluster is up") from None
    return client


def _password(settings: RemoteSettings) -> str:
    if not settings.password_file:
        return settings.password
    try:
        return Path(settings.password_file).read_text().strip()
    except OSError as e:
        raise ConfigError(f"remote.password_file {settings.password_file}: {e.strerror}") from None


class RemoteTier(Tier):
    """Records in a Redis Cluster. ``Location.key`` is the record key (the name); the Redis keys derive from it."""

    name = "remote"
    holds_records = True
    blocking = True
    shared = True

    def __init__(self, client, settings: RemoteSettings, *, clock: Callable[[], float] = time.monotonic) -> None:
        import redis

        self._errors = (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError)
        self.client = client
        # Large GETs take a buffer-at-once path (kvd.tiers.resp); TLS connections stay with redis-py.
        self._fast = None if settings.tls else FastGet(username=settings.username or None,
                                                        password=_password(settings) or None,
                                                        timeout_s=settings.timeout_s)
        self.capacity_bytes = int(settings.capacity_bytes)
        self.prefix = settings.key_prefix.encode()
        self.ttl_ms = int(settings.ttl_s * 1000) or None
        self.replicate_global = settings.replicate_global
        self.scan_limit = settings.scan_limit
        self.clock = clock
        self._lock = threading.Lock()
        self._sizes: dict[bytes, int] = {}  # record key -> bytes, of the records this host knows of
        self._fields: dict[bytes, bytes] = {}  # record key -> its manifest field (each write's own: a nonce)
        self._gone: dict[bytes, None] = {}  # manifest fields whose record a read found gone: finds skip them
        self._down_until = 0.0
        self._backoff = MIN_BACKOFF_S
        self._stale = False  # the cluster's layout must be learnt again before the next command
        self._refreshing = threading.Lock()

    # ---- keys ----------------------------------------------------------------------------------

    def record_keys(self, key: bytes) -> list[bytes]:
        """The Redis keys of one record: one, or two for a replicated global-head extent."""
        name = parse_key(key)
        copies = 2 if self.replicate_global and name is not None and name.head_class == "global" else 1
        return [b"%s:{%s}:r:%s" % (self.prefix, _tag(key + bytes([i])), key) for i in range(copies)]

    def manifest_key(self, namespace: str, fingerprint: str, hash_: str) -> bytes:
        entry = "\x1f".join([namespace, fingerprint, hash_]).encode()
        return b"%s:{%s}:m:%s" % (self.prefix, _tag(entry), entry)

    # ---- breaker -------------------------------------------------------------------------------

    def _guard(self) -> None:
        if self.clock() < self._down_until:
            raise TierUnavailable(f"remote tier unavailable for {self._down_until - self.clock():.1f} s more "
                                  "(after a failure); serving from the other tiers")
        if self._stale:
            self._refresh()

    def _refresh(self) -> None:
        """The first call after a back-off learns the cluster's layout again before it tries: a failover may
        have finished meanwhile (learnt at the failure, the layout was the failover's middle: retries hit the
        dead master, each doubling the back-off, for tens of seconds after the replica's promotion)."""
        with self._refreshing:
            if not self._stale:
                return
            try:
                self.client.nodes_manager.initialize()
            except Exception as e:  # noqa: BLE001 - the cluster is still down: the breaker covers it
                raise self._trip("layout refresh", e) from None
            self._stale = False

    def _trip(self, what: str, err: Exception) -> TierUnavailable:
        with self._lock:
            self._stale = True  # the cluster may have moved slots: refreshed before the next try
            self._down_until = self.clock() + self._backoff
            logger.warning("remote tier: %s failed (%s); not used for %.1f s", what, err, self._backoff)
            self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)
        return TierUnavailable(f"remote tier: {what} failed: {err}")

    def _ok(self) -> None:
        if self._backoff != MIN_BACKOFF_S:
            logger.info("remote tier is reachable again")
            self._backoff = MIN_BACKOFF_S

    @property
    def is_available(self) -> bool:
        return self.clock() >= self._down_until

    # ---- Tier ----------------------------------------------------------------------------------

    def reserve(self, nbytes: int, name: ExtentName | None = None) -> Location | None:
        """No room to find: the cluster's maxmemory policy makes room. Only names the record."""
        if name is None:
            raise ValueError("the remote tier keys records by extent name; reserve(nbytes, name)")
        return Location(self.name, 0, nbytes, name_key(name))

    def fits(self, nbytes: int, name: ExtentName | None = None) -> bool:
        return True

    def write(self, loc: Location, data: Buffer) -> None:
        self.write_many([(loc, data)])

    def write_many(self, items: Iterable[tuple[Location, Buffer]]) -> None:
        """Store records (all copies) and their manifest fields, pipelined. ``TierUnavailable`` if any
        command failed; what did land is then deleted again, best effort."""
        self._guard()
        items = list(items)
        pipe, fields = self.client.pipeline(transaction=False), []  # fields: each record's in the manifest
        for loc, data in items:
            header, _ = unpack_header(data, loc.key)
            name = parse_key(loc.key)
            for k in self.record_keys(loc.key):
                pipe.set(k, bytes(data), px=self.ttl_ms)
            facts = json.dumps({"key": loc.key.decode(), "codec": header.codec, "raw_nbytes": header.raw_nbytes,
                                "raw_xxh": header.raw_xxh, "nbytes": memoryview(data).nbytes, "layout": header.layout,
                                "w": secrets.token_hex(6)})
            mkey = self.manifest_key(name.namespace, name.fingerprint, name.hash)
            pipe.hset(mkey, name.head_class, facts)
            fields.append(facts.encode())
            if self.ttl_ms:
                pipe.pexpire(mkey, self.ttl_ms)
        try:
            results = pipe.execute(raise_on_error=False)
        except self._errors as e:
            raise self._trip("write", e) from None
        failed = next((r for r in results if isinstance(r, Exception)), None)
        if failed is not None:
            for loc, _ in items:
                self._delete(loc.key, quiet=True)
            raise self._trip("write", failed)
        self._ok()
        with self._lock:
            for (loc, data), field in zip(items, fields):
                self._sizes[loc.key] = memoryview(data).nbytes
                self._fields[loc.key] = field

    def read(self, loc: Location) -> bytes:
        """The record, its header checked; from the second copy when the first one's node fails.
        ``RecordMissing`` if the cluster no longer holds it, ``TierUnavailable`` if it cannot be asked."""
        self._guard()
        last: Exception | None = None
        for k in self.record_keys(loc.key):
            try:
                value = self._get(k)
            except self._errors as e:
                last = e
                continue
            if value is not None:
                self._ok()
                unpack_header(value, loc.key)
                return value
        if last is not None:
            raise self._trip("read", last)
        with self._lock:  # its manifest field may outlive it (the cluster's LRU): later finds leave it out
            self._sizes.pop(loc.key, None)
            self._gone[self._fields.pop(loc.key, b"")] = None
            if len(self._gone) > MAX_GONE:
                del self._gone[next(iter(self._gone))]
        raise RecordMissing(f"remote record {loc.key!r} is no longer in the cluster (evicted or expired)")

    def recycle(self, data) -> None:
        if self._fast is not None:
            self._fast.recycle(data)

    def _get(self, key: bytes):
        if self._fast is not None:
            node = self.client.get_node_from_key(key)
            try:
                return self._fast.get(node.host, node.port, key)
            except (FastGetUnavailable, OSError):
                pass  # a redirection, an error reply, a node gone (failover): the client follows it
        return self.client.get(key)

    def drop(self, loc: Location) -> None:
        self._guard()
        self._delete(loc.key, quiet=False)

    def _delete(self, key: bytes, *, quiet: bool) -> None:
        name = parse_key(key)
        pipe = self.client.pipeline(transaction=False)
        for k in self.record_keys(key):
            pipe.delete(k)
        if name is not None:
            pipe.hdel(self.manifest_key(name.namespace, name.fingerprint, name.hash), name.head_class)
        try:
            pipe.execute()
        except self._errors as e:
            if not quiet:
                raise self._trip("delete", e) from None
        with self._lock:
            self._sizes.pop(key, None)
            self._fields.pop(key, None)

    def stats(self) -> TierStats:
        """What this host wrote or found there (the cluster is shared; its INFO says the rest)."""
        with self._lock:
            return TierStats(self.name, self.capacity_bytes, sum(self._sizes.values()), len(self._sizes))

    # ---- shared-tier hooks ---------------------------------------------------------------------

    def find(self, keys: list[tuple[str, str, str]]) -> list[StoredRecord]:
        """The records of the entries ``keys`` (namespace, fingerprint, hash) the cluster holds: one
        pipelined round trip for all of them. ``TierUnavailable`` if the cluster cannot be asked."""
        if not keys:
            return []
        self._guard()
        mkeys = [self.manifest_key(ns, fp, h) for ns, fp, h in keys]
        manifests = self._fast_find(mkeys)
        if manifests is None:  # the fast path could not: redis-py's pipeline follows what it must
            pipe = self.client.pipeline(transaction=False)
            for k in mkeys:
                pipe.hgetall(k)
            try:
                manifests = pipe.execute()
            except self._errors as e:
                raise self._trip("find", e) from None
        self._ok()
        return self._records(manifests)

    def _fast_find(self, mkeys: list[bytes]) -> list[dict] | None:
        if self._fast is None:
            return None
        try:
            nodes: dict[tuple[str, int], list[bytes]] = {}
            for k in mkeys:
                node = self.client.get_node_from_key(k)
                nodes.setdefault((node.host, node.port), []).append(k)
            got = self._fast.hgetall_many(nodes)
        except (FastGetUnavailable, *self._errors):
            return None  # a redirection, a node gone (failover), no slot map yet
        return [got[k] for k in mkeys]

    def scan(self) -> list[StoredRecord]:
        """The cluster's entries under this prefix, up to ``scan_limit`` of them (at start)."""
        if self.scan_limit == 0:
            return []
        self._guard()
        out: list[StoredRecord] = []
        try:
            batch: list[bytes] = []
            seen = 0
            for key in self.client.scan_iter(match=self.prefix + b":{*}:m:*", count=SCAN_BATCH):
                batch.append(key)
                seen += 1
                if len(batch) == SCAN_BATCH or seen >= self.scan_limit:
                    out += self._fetch_manifests(batch)
                    batch = []
                if seen >= self.scan_limit:
                    break
            out += self._fetch_manifests(batch)
        except self._errors as e:
            raise self._trip("scan", e) from None
        self._ok()
        return out

    def _fetch_manifests(self, mkeys: list[bytes]) -> list[StoredRecord]:
        if not mkeys:
            return []
        pipe = self.client.pipeline(transaction=False)
        for k in mkeys:
            pipe.hgetall(k)
        return self._records(pipe.execute())

    def _records(self, manifests: list[dict]) -> list[StoredRecord]:
        out = []
        for fields in manifests:
            for raw in (fields or {}).values():
                if raw in self._gone:  # its record was found gone: a hit of it would be a miss at the load
                    continue
                try:
                    f = json.loads(raw)
                    key = f["key"].encode()
                    name = parse_key(key)
                    rec = StoredRecord(Location(self.name, 0, int(f["nbytes"]), key), name, str(f["codec"]),
                                       int(f["raw_nbytes"]), int(f["raw_xxh"]), str(f.get("layout", "")))
                except (ValueError, KeyError, TypeError, AttributeError):
                    logger.warning("remote tier: an unreadable manifest field was skipped")
                    continue
                if name is not None:
                    out.append(rec)
                    with self._lock:
                        self._sizes[key] = rec.location.nbytes
                        self._fields[key] = raw
        return out

    def put_meta(self, name: str, value: bytes) -> None:
        """Registrations beside the records, so every host can adopt entries of models its engines have
        not registered yet (at start)."""
        self._guard()
        try:
            self.client.set(b"%s:meta:%s" % (self.prefix, name.encode()), value)
        except self._errors as e:
            raise self._trip("put_meta", e) from None

    def get_meta(self, name: str) -> bytes | None:
        self._guard()
        try:
            return self.client.get(b"%s:meta:%s" % (self.prefix, name.encode()))
        except self._errors as e:
            raise self._trip("get_meta", e) from None

    def close(self) -> None:
        if self._fast is not None:
            self._fast.close()
        try:
            self.client.close()
        except self._errors:
            pass


def _tag(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=6).hexdigest().encode()
