# One way to do each thing: the README, CI and people all use these targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision are installed first, pinned to a pair known to work together; override for another
# platform, e.g. `make install TORCH_PINS="torch torchvision"`.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
ARTIFACTS ?= artifacts
CHECKPOINT := $(ARTIFACTS)/convnet.pt
EXPORT_DIR := $(ARTIFACTS)/export
TRAIN_ARGS ?=
# MNIST: $MNIST_DATA_DIR if set; else the read-only copy beside the checkout where there is one (CI and the
# development machines have no internet); else ./data, downloaded by torchvision.
MNIST_DATA_DIR ?= $(if $(wildcard ../shared/data/MNIST/raw),$(abspath ../shared/data),)
export MNIST_DATA_DIR

.PHONY: install test test-fast train export serve bento bench bench-quick bench-peers lint clean \
	docker-up container container-gpu container-test container-gpu-test

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

# The browser test (tests/service/test_ui.py) needs Debian's Chromium and its driver, the alert rules' tests
# (tests/deploy/test_alerts.py) promtool from Debian's prometheus package, the feedback store's tests a real
# PostgreSQL server (tests/postgres.py): installed where apt-get can (as root, as on CI); elsewhere those tests are
# skipped with the reason (on CI, a missing promtool or PostgreSQL fails them).
test: install
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1) || \
		 echo "note: Chromium could not be installed; the browser test will be skipped")
	@command -v promtool >/dev/null || \
		(apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1) || \
		 echo "note: promtool could not be installed; the alert rules' tests will be skipped")
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
		(apt-get install -y -q postgresql >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q postgresql >/dev/null 2>&1) || \
		 echo "note: PostgreSQL could not be installed; the feedback store's PostgreSQL tests will be skipped")
	$(PY) -m pytest

# The tests not marked slow (no `bentoml serve`, no model store, no work processes), with the coverage of service/.
test-fast: install
	$(PY) -m pytest -m "not slow" -q --cov=service --cov-report=term-missing:skip-covered --cov-fail-under=75

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

train: install
	$(PY) -m training --out $(ARTIFACTS) $(TRAIN_ARGS)

$(CHECKPOINT):
	$(MAKE) train

# Re-exported whenever the checkpoint is newer than the manifest; registration is skipped when the model
# store already holds these exact files.
# SIGN_KEY=model.key signs the folder (README "Signed models").
SIGN_KEY ?=
$(EXPORT_DIR)/manifest.json: $(CHECKPOINT)
	$(PY) -m export build --checkpoint $(CHECKPOINT) --out $(EXPORT_DIR) $(if $(SIGN_KEY),--sign-key $(SIGN_KEY))

export: install $(EXPORT_DIR)/manifest.json
	$(PY) -m export register $(EXPORT_DIR)

PORT ?= 3000
serve: export
	$(PY) -m bentoml serve --port $(PORT)

bento: export
	$(PY) -m bentoml build

# Containers (README "Deploy"), not part of `make test`: images named after the bento, tagged <version> and latest.
# They build on the Debian base deploy/base-image.sh makes here when it is missing (no registry needed);
# BASE_IMAGE=python:3.11-slim builds on a registry's base instead.
BASE_IMAGE ?=
DIGIT_IMAGE ?= ../shared/book/digit_image.jpg
DEPLOY_BASE := $(if $(BASE_IMAGE),--base-image $(BASE_IMAGE))

docker-up:
	deploy/docker-up.sh

container: export docker-up
	$(PY) -m deploy build $(DEPLOY_BASE)

container-gpu: export docker-up
	$(PY) -m deploy build --bentofile bentofile.gpu.yaml $(DEPLOY_BASE)

container-test: container
	$(PY) -m deploy check mnist-classifier:latest --digit-image $(DIGIT_IMAGE)

container-gpu-test: container-gpu
	$(PY) -m deploy check mnist-classifier-gpu:latest --digit-image $(DIGIT_IMAGE)

# Benchmarks: not part of `make test`. They need wrk and hey (Debian's packages), the bench extra (Flask,
# psutil) and the peer servers' own venv (bench-peers).
bench-deps: install
	@command -v wrk >/dev/null && command -v hey >/dev/null || (apt-get install -y wrk hey || sudo apt-get install -y wrk hey)
	$(PY) -m pip install -q -e '.[dev,bench]'

bench: bench-deps bench-peers
	$(PY) -m bench.run

bench-quick: bench-deps bench-peers
	$(PY) -m bench.run --quick

# TorchServe, LitServe, Ray Serve and FastAPI in their own venv (.bench-venv), for
# `$(PY) -m bench.peers --check | --compare`
bench-peers: bench-deps
	bash bench/peers/setup.sh

clean:
	rm -rf $(ARTIFACTS) .pytest_cache
