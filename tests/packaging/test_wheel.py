"""The distribution: what the wheel ships, what it requires, and that it runs without torch.

The wheel is built from a copy of the tree (nothing written into the checkout), without build
isolation (setuptools comes from the test extra). Its dependencies are downloaded once into pytest's
cache (``.pytest_cache/d/wheelhouse``), then installed offline from there into a fresh venv.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.daemon_proc import free_port

ROOT = Path(__file__).resolve().parents[2]
DIST = "kvd-cache"
ENGINE_ONLY = {"torch", "triton", "vllm", "sglang", "transformers", "accelerate", "nvidia-ml-py", "gguf"}
EXTRAS = {"vllm", "sglang", "hf", "profile", "gpu"}


def _pip(*args: str, python: str = sys.executable, timeout: float = 600) -> None:
    r = subprocess.run([python, "-m", "pip", "-q", "--disable-pip-version-check", *args], capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, f"pip {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    shutil.copytree(ROOT / "kvd", src / "kvd", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(src))
    return next(out.glob("kvd_cache-*.whl"))


def _metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(z.read(name).decode())


def test_wheel_ships_head_maps_unit_and_defaults(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        shipped = {"kvd/data/kvd.service": ROOT / "config/kvd.service", "kvd/defaults.toml": ROOT / "config/kvd.toml"}
        shipped |= {f"kvd/data/heads/{p.name}": p for p in (ROOT / "config/heads").glob("*.json")}
        assert len(shipped) >= 3 and set(shipped) <= names, sorted(set(shipped) - names)
        for inside, source in shipped.items():
            assert z.read(inside) == source.read_bytes(), inside


def test_daemon_requirements_hold_no_engine_and_extras_exist(wheel):
    meta = _metadata(wheel)
    assert meta["Name"] == DIST
    reqs = [Requirement(r) for r in meta.get_all("Requires-Dist")]
    core = {r.name for r in reqs if r.marker is None or "extra" not in str(r.marker)}
    assert not core & ENGINE_ONLY, core & ENGINE_ONLY
    assert EXTRAS <= set(meta.get_all("Provides-Extra"))
    gpu = {r.name for r in reqs if r.marker is not None and r.marker.evaluate({"extra": "gpu"})} - core
    assert gpu == {"nvidia-ml-py", "torch"}  # GPU telemetry, and the GPU tier (docs/gpu.md)


@pytest.fixture(scope="module")
def fresh_venv(wheel, tmp_path_factory, pytestconfig) -> Path:
    """A new venv holding the wheel and its dependencies only, installed with no index."""
    cache = getattr(pytestconfig, "cache", None)  # None under -p no:cacheprovider: download afresh
    house = Path(cache.mkdir("wheelhouse")) if cache else tmp_path_factory.mktemp("wheelhouse")
    # The wheel's own requirements (not the wheel: an older build of the same name may lie there);
    # files already in the house are not fetched again.
    core = [r for r in _metadata(wheel).get_all("Requires-Dist") if "extra ==" not in r]
    _pip("download", "-d", str(house), *core)
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    _pip("install", "--no-index", "--find-links", str(house), str(wheel), python=str(venv / "bin/python"))
    return venv


def test_fresh_install_has_no_torch_and_serves_kvctl_status(fresh_venv, tmp_path):
    py = str(fresh_venv / "bin/python")
    probe = "import importlib.util as u, kvd; print(u.find_spec('torch'), u.find_spec('triton'), kvd.__file__)"
    torch_spec, triton_spec, where = subprocess.run([py, "-c", probe], capture_output=True, text=True, check=True,
                                                    cwd=tmp_path, timeout=60).stdout.split()
    assert (torch_spec, triton_spec) == ("None", "None") and where.startswith(str(fresh_venv))
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVD_")}
    env |= {"KVD_HOST__PATH": str(tmp_path / "arena"), "KVD_HOST__CAPACITY_BYTES": "16MiB",
            "KVD_SSD__PATH": str(tmp_path / "ssd"), "KVD_SOCKET": str(tmp_path / "kvd.sock")}
    daemon = subprocess.Popen([str(fresh_venv / "bin/kvd"), "--socket", env["KVD_SOCKET"],
                               "--metrics-addr", f"127.0.0.1:{free_port()}"], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        kvctl = str(fresh_venv / "bin/kvctl")
        deadline = time.monotonic() + 60
        while True:
            r = subprocess.run([kvctl, "status"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
            if r.returncode == 0 or time.monotonic() > deadline or daemon.poll() is not None:
                break
            time.sleep(0.2)
        assert r.returncode == 0 and " ok, up " in r.stdout, (r.stdout, r.stderr)
        unit = subprocess.run([kvctl, "files", "unit"], env=env, capture_output=True, text=True, check=True,
                              timeout=60).stdout.strip()
        assert unit.startswith(str(fresh_venv)) and Path(unit).read_text().startswith("# kvd under systemd")
    finally:
        daemon.send_signal(signal.SIGTERM)
        out, _ = daemon.communicate(timeout=60)
    assert daemon.returncode == 0, out[-2000:]
