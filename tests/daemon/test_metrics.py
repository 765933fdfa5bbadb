"""``/metrics`` in-process: prometheus_client's exposition (format by Accept, gzip), no ``_created``,
process and build-info series, labelled counters there before their first event, scrapes kept out
of the API's latency histogram, and the README's metrics table equal to the registry, both ways."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from kvd import __version__
from kvd.core.config import load_settings
from kvd.daemon.service import create_app, create_metrics_app

README = Path(__file__).resolve().parents[2] / "README.md"
PLAIN = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS = "application/openmetrics-text; version=1.0.0"


@pytest.fixture
async def apps(tmp_path):
    settings = load_settings(None, environ={}, overrides={
        "host": {"capacity_bytes": 4 << 20, "path": str(tmp_path / "arena")},
        "ssd": {"path": str(tmp_path / "ssd"), "capacity_bytes": 64 << 20}})
    control = TestClient(TestServer(create_app(settings)))
    await control.start_server()  # the store exists (and its tiers are known) from here
    metrics = TestClient(TestServer(create_metrics_app(control.app)))
    await metrics.start_server()
    yield control, metrics
    await metrics.close()
    await control.close()


async def _families(metrics) -> dict:
    r = await metrics.get("/metrics")
    return {f.name: f for f in text_string_to_metric_families(await r.text())}


async def test_exposition_negotiates_the_format_and_compresses(apps):
    _, metrics = apps
    r = await metrics.get("/metrics")
    assert r.headers["Content-Type"] == PLAIN
    r = await metrics.get("/metrics", headers={"Accept": f"{OPENMETRICS},text/plain;version=0.0.4;q=0.5",
                                               "Accept-Encoding": "gzip"})
    body = await r.text()  # aiohttp's client undoes the gzip
    assert r.headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    assert r.headers["Content-Encoding"] == "gzip" and body.endswith("# EOF\n")
    r = await metrics.get("/metrics", params={"name[]": "kvd_build_info"})
    assert [f.name for f in text_string_to_metric_families(await r.text())] == ["kvd_build_info"]


async def test_no_created_series_and_process_and_build_info_are_there(apps):
    _, metrics = apps
    for accept in (PLAIN, OPENMETRICS):
        text = await (await metrics.get("/metrics", headers={"Accept": accept})).text()
        assert "_created" not in text, accept
    fams = await _families(metrics)
    assert fams["process_cpu_seconds"].samples[0].value > 0 and "process_resident_memory_bytes" in fams
    (build,) = fams["kvd_build_info"].samples
    assert build.labels["version"] == __version__ and build.labels["distribution"] == "kvd-cache"


async def test_labelled_counters_exist_before_their_first_event(apps):
    _, metrics = apps
    fams = await _families(metrics)
    empty = [n for n, f in fams.items() if n.startswith("kvd_") and f.type == "counter" and not f.samples]
    assert not empty, f"labelled counters without series until their first event: {empty}"

    def has(name, **labels):
        return any(all(s.labels.get(k) == v for k, v in labels.items()) for s in fams[name].samples)

    assert has("kvd_demotions", tier="ssd", head_class="local") and has("kvd_promotions", tier="ssd", head_class="global")
    assert has("kvd_moved_seconds", direction="demote", tier="ssd") and has("kvd_moved_bytes", direction="load", tier="host")
    assert has("kvd_codec_raw_bytes", codec="lossless", op="decode") and has("kvd_codec_seconds", codec="fp8", op="encode")
    assert has("kvd_hit_tokens", kind="chunk", tier="ssd") and has("kvd_leases_expired", reason="owner_died")
    assert has("kvd_errors", kind="internal") and has("kvd_requests", route="/v1/lookup", status="200")
    assert has("kvd_tier_errors", tier="ssd", op="read") and not has("kvd_tier_writes", tier="host")


async def test_scrapes_are_not_counted_as_api_requests(apps):
    control, metrics = apps
    await control.get("/v1/health")
    for _ in range(3):
        await metrics.get("/metrics")
        await metrics.get("/healthz")
    fams = await _families(metrics)
    routes = {s.labels["route"] for s in fams["kvd_request_duration_seconds"].samples}
    routes |= {s.labels["route"] for s in fams["kvd_requests"].samples if s.value > 0}
    assert routes == {"/v1/health"}


def readme_table() -> list[tuple[list[str], list[str], str]]:
    """(metric names, label names, text) per row of the README's metrics table."""
    section = README.read_text().split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([a-z_:*]+)`", cells[0])
        rows.append((names, [x.strip() for x in cells[1].split(",") if x.strip()], cells[2]))
    return rows


def _family_of(name: str, fams: dict):
    for base in (name, name.removesuffix("_total"), name.removesuffix("_info")):
        if base in fams:
            return fams[base]
    return None


async def test_readme_metrics_table_equals_the_registry(apps):
    """The table missed 7 series and listed a label that does not exist."""
    _, metrics = apps
    fams = await _families(metrics)
    listed = set()
    for names, labels, _what in readme_table():
        for name in names:
            if name.endswith("*") or (name.startswith("kvd_gpu_") and "kvd_gpu_memory_used_bytes" not in fams):
                continue  # a wildcard, or GPU telemetry on a machine without a GPU
            fam = _family_of(name, fams)
            assert fam is not None, f"README lists {name}; /metrics has no such series"
            listed.add(fam.name)
            got = {k for s in fam.samples for k in s.labels} - {"le"}
            if fam.samples:
                assert got == set(labels), f"{name}: README says labels {labels}, /metrics has {sorted(got)}"
    missing = sorted(n for n in fams if n.startswith("kvd_") and n not in listed)
    assert not missing, f"/metrics serves {missing}; add them to README's metrics table"
