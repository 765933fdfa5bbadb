"""The one error hierarchy of kvd.

Every error a caller may want to handle is a ``KvdError``. Each carries the HTTP status the control
API answers with, so the API's error middleware maps them in one place, and the client turns an error
answer back into the same type. Messages say what was wrong, the value seen, what was expected and
what to do.
"""

from __future__ import annotations


class KvdError(Exception):
    """Base of every kvd error. ``status`` is the HTTP status the control API answers with."""

    status: int = 500
    code: str = "internal"


class InvalidRequest(KvdError):
    """The request is malformed or asks for something impossible (bad shape, absurd count)."""

    status = 400
    code = "invalid_request"


class RequestTimeout(InvalidRequest):
    status = 408
    code = "timeout"


class UnsupportedMediaType(InvalidRequest):
    status = 415
    code = "unsupported_media_type"


class RequestTooLarge(InvalidRequest):
    status = 413
    code = "too_large"


class Forbidden(KvdError):
    """The caller may not do this: a namespace of another tenant, an admin action, another process's
    lease or reservation."""

    status = 403
    code = "forbidden"


class NotFound(KvdError):
    """A model, entry, reservation or lease the request names does not exist (or expired)."""

    status = 404
    code = "not_found"


class Conflict(KvdError):
    """The request contradicts the current state (double commit, re-registration with other shapes)."""

    status = 409
    code = "conflict"


class FingerprintMismatch(Conflict):
    """KV of one model layout was about to meet another: never served, never stored."""

    code = "fingerprint_mismatch"


class ShuttingDown(KvdError):
    status = 503
    code = "shutting_down"


class DaemonUnavailable(KvdError):
    """Client side: the daemon cannot be reached or did not answer in time. Engines recompute."""

    status = 503
    code = "unavailable"


class ProtocolMismatch(DaemonUnavailable):
    """Client side: the daemon answered something this client cannot read (a daemon of another version
    missing a field the client needs, or another answer than asked for). Engines recompute, as for a
    daemon that is away; fields a newer daemon only added are ignored and raise nothing."""

    code = "protocol_mismatch"


class ConfigError(KvdError):
    """A setting is unknown or has a bad value; raised at startup, before anything is touched."""

    code = "config"


class HeadMapError(InvalidRequest):
    """A head map file or object is malformed or does not fit the model it is used with."""

    code = "head_map"


class CorruptData(KvdError):
    """Bytes read back do not match their checksum or header. The entry is treated as a miss."""

    code = "corrupt"


class StorageFormatError(KvdError):
    """An on-disk store was written by another format version or is not a kvd store at all."""

    code = "storage_format"


class SsdFull(KvdError):
    """The LMDB map or the disk is full although the capacity accounting had room (B-tree overhead,
    fragmentation, a disk shared with others). Nothing of the failed transaction was written."""

    status = 507
    code = "ssd_full"

    def __init__(self, message: str, num_written: int = 0) -> None:
        super().__init__(message)
        self.num_written = num_written  # write_many: this many leading items were committed


class TierUnavailable(KvdError):
    """A tier cannot be reached right now (a cluster node down, a timeout). Its copies are not
    served until it answers again; the engine recomputes meanwhile. Never a reason to fail a request."""

    status = 503
    code = "tier_unavailable"


class RecordMissing(CorruptData):
    """A record the index expected is gone from its tier (e.g. the cluster's LRU evicted it): a miss,
    counted apart from corruption, never served."""

    code = "record_missing"


ERRORS_BY_CODE: dict[str, type[KvdError]] = {
    cls.code: cls
    for cls in (
        KvdError,
        InvalidRequest,
        RequestTooLarge,
        RequestTimeout,
        UnsupportedMediaType,
        NotFound,
        Forbidden,
        Conflict,
        FingerprintMismatch,
        ShuttingDown,
        DaemonUnavailable,
        ProtocolMismatch,
        ConfigError,
        HeadMapError,
        CorruptData,
        StorageFormatError,
        SsdFull,
        TierUnavailable,
        RecordMissing,
    )
}
