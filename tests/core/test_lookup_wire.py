"""The lookup's compact encoding: round trips (hypothesis) and every malformed request named by field."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from kvd.core import lookup_wire as W
from kvd.core.errors import InvalidRequest
from kvd.core.protocol import LookupRequest

hashes = st.lists(st.binary(min_size=16, max_size=16).map(bytes.hex), max_size=40)
requests = st.builds(
    lambda fp, ns, prefix, chunks, with_lengths, prefetch, lossy, max_tokens: LookupRequest(
        fingerprint=fp, namespace=ns, prefix_hashes=prefix or None, chunk_hashes=chunks or None,
        chunk_num_tokens=[len(h) * 7 for h in chunks] if with_lengths and chunks else None, prefetch=prefetch,
        accept_lossy=lossy, max_tokens=max_tokens, computed_under="hm-0123456789abcdef" if lossy else "exact"),
    st.text(min_size=1, max_size=60), st.from_regex(r"[A-Za-z0-9_.:@/-]{1,64}", fullmatch=True), hashes, hashes,
    st.booleans(), st.booleans(), st.booleans(), st.none() | st.integers(0, 1 << 40))


@given(requests)
def test_request_round_trips(req):
    assert W.decode_lookup(W.encode_lookup(req)) == req


@dataclass
class Row:
    index: int
    tier: str
    classes: tuple[str, ...]
    complete: bool
    num_tokens: int


@dataclass
class Result:
    chunk_tokens: int
    num_prefix_hits: int
    prefix: list[Row]
    chunks: list[Row]


def test_answer_round_trips_rows_with_the_requests_hashes():
    req = LookupRequest(fingerprint="f", prefix_hashes=[f"{i:032x}" for i in range(5)],
                        chunk_hashes=[f"{100 + i:032x}" for i in range(3)])
    res = Result(256, 2, [Row(0, "host", ("global", "local"), True, 256), Row(1, "ssd", ("global", "local"), True, 256),
                          Row(4, "host", ("global",), False, 128)], [Row(2, "remote", ("local",), False, 256)])
    got = W.decode_answer(W.encode_answer(res), req)
    assert (got.chunk_tokens, got.num_prefix_hits) == (256, 2)
    assert got.prefix == [W.LookupRow(0, f"{0:032x}", "host", ("global", "local"), True, 256),
                          W.LookupRow(1, f"{1:032x}", "ssd", ("global", "local"), True, 256),
                          W.LookupRow(4, f"{4:032x}", "host", ("global",), False, 128)]
    assert got.chunks == [W.LookupRow(2, f"{102:032x}", "remote", ("local",), False, 256)]


def test_an_empty_answer_round_trips():
    got = W.decode_answer(W.encode_answer(Result(256, 0, [], [])), LookupRequest(fingerprint="f"))
    assert got == W.LookupAnswer(256, 0, [], [])


def test_token_ids_are_refused_by_the_encoder():
    with pytest.raises(ValueError, match="token ids"):
        W.encode_lookup(LookupRequest(fingerprint="f", token_ids=[1, 2]))


class WiderRequest(LookupRequest):
    reader: str = "exact"  # a field the compact form does not carry


def test_a_field_the_encoding_does_not_carry_is_refused_unless_default():
    """A request field added to the model later must never be dropped on the wire without a word."""
    assert W.decode_lookup(W.encode_lookup(WiderRequest(fingerprint="f"))) == LookupRequest(fingerprint="f")
    with pytest.raises(ValueError, match="reader"):
        W.encode_lookup(WiderRequest(fingerprint="f", reader="head_aware"))


GOOD = W.encode_lookup(LookupRequest(fingerprint="fp", namespace="ns", prefix_hashes=["ab" * 16] * 3,
                                     chunk_hashes=["cd" * 16], chunk_num_tokens=[256], max_tokens=700))


def text(s: bytes) -> bytes:
    return bytes([len(s)]) + s


BAD = [
    # (body, field the error must name)
    (b"KVL", "magic"),
    (b"JSON" + GOOD[4:], "magic"),
    (b"KVL1", "flags"),
    (b"KVL1\x40" + GOOD[5:], "flags"),
    (b"KVL1\x00\x05fp", "fingerprint"),
    (b"KVL1\x00" + text(b"\xff\xfe") + text(b"ns") + text(b"exact") + b"\0" * 8, "fingerprint"),
    (b"KVL1\x00" + text(b"fp") + text(b"a b") + text(b"exact") + b"\0" * 8, "namespace"),
    (b"KVL1\x00" + text(b"fp") + text(b"ns") + text(b"fast") + b"\0" * 8, "computed_under"),
    (b"KVL1\x04" + text(b"fp") + text(b"ns") + text(b"exact") + b"\0" * 3, "max_tokens"),
    (b"KVL1\x04" + text(b"fp") + text(b"ns") + text(b"exact") + struct.pack("<Q", 1 << 62) + b"\0" * 8, "max_tokens"),
    (GOOD[: len(GOOD) - 4 - 16 - 4 - 20], "prefix_hashes"),  # the third hash cut short
    (b"KVL1\x00" + text(b"fp") + text(b"ns") + text(b"exact") + struct.pack("<I", 1 << 30), "prefix_hashes"),
    (GOOD[:-6], "chunk_hashes"),
    (GOOD[:-2], "chunk_num_tokens"),
    (GOOD[:-4] + struct.pack("<I", 1 << 21), "chunk_num_tokens"),
    (GOOD + b"\0", "after the last field"),
]


@pytest.mark.parametrize("body, field", BAD, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD)])
def test_a_malformed_request_names_its_field(body, field):
    with pytest.raises((InvalidRequest, ValidationError)) as e:
        W.decode_lookup(body)
    msg = str(e.value) if isinstance(e.value, InvalidRequest) else " ".join(
        ".".join(map(str, err["loc"])) for err in e.value.errors())
    assert field in msg, msg


def test_a_malformed_answer_is_a_value_error():
    with pytest.raises(ValueError, match="malformed"):
        W.decode_answer(W.encode_answer(Result(256, 0, [Row(0, "host", ("g",), True, 1)], []))[:-1],
                        LookupRequest(fingerprint="f", prefix_hashes=["ab" * 16]))
