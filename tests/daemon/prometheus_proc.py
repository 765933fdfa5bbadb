"""A real Prometheus (Debian's ``prometheus`` package; ``make test`` installs it) scraping one target
every second, and its HTTP query API."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tests.daemon_proc import free_port

SCRAPE_INTERVAL_S = 1


@dataclass
class PrometheusProc:
    root: Path
    target: str  # host:port of the /metrics endpoint
    proc: subprocess.Popen | None = None
    port: int = 0

    @staticmethod
    def binary() -> str | None:
        return shutil.which("prometheus")

    def start(self, timeout: float = 60.0) -> PrometheusProc:
        self.port = free_port()
        cfg = self.root / "prometheus.yml"
        cfg.write_text(f"global:\n  scrape_interval: {SCRAPE_INTERVAL_S}s\n  evaluation_interval: {SCRAPE_INTERVAL_S}s\n"
                       f"scrape_configs:\n  - job_name: kvd\n    static_configs:\n      - targets: ['{self.target}']\n")
        log = open(self.root / "prometheus.log", "ab")
        self.proc = subprocess.Popen(
            [self.binary(), f"--config.file={cfg}", f"--storage.tsdb.path={self.root / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus did not start:\n{(self.root / 'prometheus.log').read_text()[-3000:]}")
            time.sleep(0.2)
        return self

    def _ready(self) -> bool:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2).status == 200
        except OSError:
            return False

    def api(self, path: str, **params: str) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        doc = json.loads(urllib.request.urlopen(url, timeout=30).read())
        assert doc["status"] == "success", doc
        return doc["data"]

    def query(self, expr: str) -> list[dict]:
        """An instant query at the present; the result vector (``[{metric, value: [t, "v"]}, ...]``)."""
        return self.api("query", query=expr, time=f"{time.time():.3f}")["result"]

    def wait_for_scrapes(self, n: int, timeout: float = 60.0) -> None:
        """Until the target has been scraped successfully ``n`` more times."""
        def count() -> int:
            r = self.query('count_over_time(up{job="kvd"}[1h])')
            return int(float(r[0]["value"][1])) if r else 0

        want, deadline = count() + n, time.monotonic() + timeout
        while count() < want:
            assert time.monotonic() < deadline, f"prometheus scraped {self.target} fewer than {n} times"
            time.sleep(SCRAPE_INTERVAL_S / 2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
