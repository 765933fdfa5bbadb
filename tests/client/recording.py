"""A real ``KvdClient`` that keeps the requests it sends (and can mark leased extents lossy, as a daemon
holding only a lossy copy answers a reader that accepts it)."""

from __future__ import annotations

from kvd.client.client import KvdClient
from kvd.core import protocol as P


class RecordingClient(KvdClient):
    def __init__(self, *a, **kw) -> None:
        kw.setdefault("register_cuda", False)
        super().__init__(*a, **kw)
        self.sent: list = []
        self.lossy = False

    def _exchange(self, method, path, req, body, timeout, content_type="application/json"):
        self.sent.append(req)  # every request, JSON or compact (lookup_compact), passes here
        return super()._exchange(method, path, req, body, timeout, content_type)

    def lease(self, req: P.LeaseRequest) -> P.LeaseResponse:
        resp = super().lease(req)
        if self.lossy:
            for e in resp.entries:
                e.extents = [x.model_copy(update={"lossy": True}) for x in e.extents]
        return resp

    def last(self, kind: type):
        """The last request of type ``kind`` sent."""
        return [r for r in self.sent if isinstance(r, kind)][-1]
