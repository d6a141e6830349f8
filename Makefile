# The README's two commands. Each sets up its own virtual environment (.venv)
# from the pinned files in backends/, so both work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BACKENDS ?= tensorflow torch jax
STAMP := $(VENV)/.mhsa-core-installed

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml backends/requirements-common.txt backends/requirements-tensorflow.txt backends/requirements-torch.txt backends/requirements-jax.txt backends/requirements-all.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r backends/requirements-all.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

# The cross-backend matrix on the built-in cases. The parent process runs no
# framework (KERAS_BACKEND=numpy keeps its keras import light); each backend
# runs in a worker process of its own.
demo: $(STAMP)
	KERAS_BACKEND=numpy $(VENV)/bin/mhsa-core matrix

# One pytest process per backend (Keras fixes the backend at import), then the
# cross-backend matrix tests once (their workers are subprocesses). Every run
# happens even if one fails; the target fails if any did.
test: $(STAMP)
	@failed=""; \
	for b in $(BACKENDS); do \
	  echo "=== KERAS_BACKEND=$$b ==="; \
	  KERAS_BACKEND=$$b $(PY) -m pytest tests --ignore=tests/consistency || failed="$$failed $$b"; \
	done; \
	echo "=== cross-backend matrix ==="; \
	KERAS_BACKEND=numpy $(PY) -m pytest tests/consistency || failed="$$failed matrix"; \
	if [ -n "$$failed" ]; then echo "FAILED:$$failed"; exit 1; fi; \
	echo "all passed: $(BACKENDS) and the cross-backend matrix"

clean:
	rm -rf $(VENV) build src/*.egg-info
