"""The daemon with a ``:PORT`` metrics address (every interface) and an ``0o`` socket mode."""

import os
import stat
import urllib.request

from tests.daemon_proc import DaemonProc, free_port


def test_port_only_metrics_address_and_octal_socket_mode(tmp_path):
    port = free_port()
    d = DaemonProc(tmp_path, env_extra={"KVD_DAEMON__SOCKET_MODE": "0o600"}, args=["--metrics-addr", f":{port}"])
    d.start()
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        assert b"kvd_build_info" in body
        assert stat.S_IMODE(os.stat(d.socket).st_mode) == 0o600
    finally:
        assert d.stop() == 0
