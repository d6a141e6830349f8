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

demo: $(STAMP)
	$(VENV)/bin/mhsa-core demo

# One pytest process per backend (Keras fixes the backend at import). Every
# backend runs even if one fails; the target fails if any did.
test: $(STAMP)
	@failed=""; \
	for b in $(BACKENDS); do \
	  echo "=== KERAS_BACKEND=$$b ==="; \
	  KERAS_BACKEND=$$b $(PY) -m pytest tests || failed="$$failed $$b"; \
	done; \
	if [ -n "$$failed" ]; then echo "FAILED backends:$$failed"; exit 1; fi; \
	echo "all backends passed: $(BACKENDS)"

clean:
	rm -rf $(VENV) build src/*.egg-info
