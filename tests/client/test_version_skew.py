"""A daemon of another version than its clients: a rolling upgrade restarts the daemon on a new package
while engines keep the old client loaded (or the reverse). Requests stay strict (the daemon answers 400
naming an unknown field); answers are read leniently: a field a newer daemon added is ignored, and an
answer the client cannot read at all is a ``ProtocolMismatch`` (a ``DaemonUnavailable``), which an
engine's session treats as the daemon being away: it recomputes, it never fails the request."""

from __future__ import annotations

import json

import pytest
import torch
from aiohttp import web

from kvd.client import prefix as kvio
from kvd.client.client import KvdClient
from kvd.client.session import DaemonSession
from kvd.core.errors import DaemonUnavailable, ProtocolMismatch
from kvd.core.keys import ModelSpec
from kvd.daemon import api
from tests.daemon_thread import ThreadDaemon, settings_for

SPEC = ModelSpec("skew", num_layers=2, num_kv_heads=2, head_dim=16, kv_dtype="bfloat16")
TOKENS = list(range(3 * 256))


def _with_new_fields(doc):
    """Every object of an answer (the answer and the objects in its lists) with a field no client knows."""
    if isinstance(doc, list):
        return [_with_new_fields(x) for x in doc]
    if isinstance(doc, dict):
        return {**{k: _with_new_fields(v) if isinstance(v, list) else v for k, v in doc.items()},
                "added_by_a_newer_daemon": {"any": [1, 2]}}
    return doc


def _daemon_answering(tmp_path, monkeypatch, change):
    def answer(model, status: int = 200) -> web.Response:
        doc = change(json.loads(model.model_dump_json()))
        return web.Response(body=json.dumps(doc), status=status, content_type="application/json")

    monkeypatch.setattr(api, "_json", answer)
    return ThreadDaemon(settings_for(tmp_path, ssd={"enabled": False})).start()


def test_fields_a_newer_daemon_added_are_ignored_and_kv_round_trips(tmp_path, monkeypatch):
    d = _daemon_answering(tmp_path, monkeypatch, _with_new_fields)
    try:
        kv = torch.randn(SPEC.num_layers, 2, SPEC.num_kv_heads, len(TOKENS), SPEC.head_dim).bfloat16()
        with KvdClient(d.socket, register_cuda=False) as c:
            h = kvio.register(c, SPEC)
            assert kvio.store_prefix(h, TOKENS, kv).stored == 3
            assert c.stats().num_entries == 3 and c.models().models[0].num_entries == 3
            out = torch.zeros_like(kv)
            with kvio.load_prefix(h, TOKENS) as loaded:
                assert loaded.num_tokens == len(TOKENS)
                loaded.copy_into(out)
            assert torch.equal(out, kv)
            assert c.stats().leases_held == 0
    finally:
        d.stop()


def test_an_answer_the_client_cannot_read_is_a_protocol_mismatch_and_an_engine_recomputes(tmp_path, monkeypatch):
    """An older daemon that lacks a field the client needs: a clear error naming the route and the field,
    of the kind engines already survive, instead of pydantic's ValidationError ending the engine."""
    d = _daemon_answering(tmp_path, monkeypatch, lambda doc: {k: v for k, v in doc.items() if k != "chunk_tokens"})
    try:
        with KvdClient(d.socket, register_cuda=False) as c:
            with pytest.raises(ProtocolMismatch, match=r"/v1/models.*chunk_tokens") as err:
                kvio.register(c, SPEC)
            assert isinstance(err.value, DaemonUnavailable)
        session = DaemonSession(KvdClient(d.socket, register_cuda=False), SPEC, None)
        try:
            assert session.call("lookup", lambda h: pytest.fail("no handle without a registration")) is None
            assert session.counters["daemon_failures"] == 1
        finally:
            session.close()
    finally:
        d.stop()
