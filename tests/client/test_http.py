"""The client's transport: the daemon's error answers become kvd's own exception types."""

import pytest

from kvd.client.http import raise_for
from kvd.core.errors import InvalidRequest, KvdError, NotFound


@pytest.mark.parametrize("body, kind, words", [
    (b'{"error": "invalid_request", "message": "namespace: bad"}', InvalidRequest, "/v1/lookup: namespace: bad"),
    (b'{"error": "not_found", "message": "model not registered"}', NotFound, "not registered"),
    (b'{"error": "no_such_code", "message": "odd"}', KvdError, "odd"),
    (b"<html>proxy error</html>", KvdError, "proxy error"),
    (b"", KvdError, "HTTP 502"),
])
def test_error_answers_raise_the_daemons_error_type(body, kind, words):
    with pytest.raises(kind, match=words) as e:
        raise_for(502, body, "/v1/lookup")
    assert type(e.value) is kind
