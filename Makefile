# The README's two commands. Each sets up its own virtual environment (.venv)
# from the pinned files in backends/, so both work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BACKENDS ?= tensorflow torch jax
STAMP := $(VENV)/.mhsa-core-installed

.PHONY: demo example lint test test-other-kernels docs install clean

install: $(STAMP)

$(STAMP): pyproject.toml backends/requirements-common.txt backends/requirements-tensorflow.txt backends/requirements-torch.txt backends/requirements-jax.txt backends/requirements-export.txt backends/requirements-example.txt backends/requirements-dev.txt backends/requirements-docs.txt backends/requirements-all.txt backends/requirements-peers.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r backends/requirements-all.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r backends/requirements-peers.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

# The cross-backend matrix on the built-in cases. The parent process runs no
# framework (KERAS_BACKEND=numpy keeps its keras import light); each backend
# runs in a worker process of its own.
demo: $(STAMP)
	KERAS_BACKEND=numpy $(VENV)/bin/mhsa-core matrix

# End to end on scikit-learn's bundled digits: train under one backend, load
# the .keras file under the other two (a process each), accuracy per backend at
# the trained 16x16 and at 24x24, the matrix verdict on the trained model, and
# an attention-map PNG. Files in example-out/; about 6 minutes on 2 cores.
example: $(STAMP)
	$(PY) examples/train_digits.py --out example-out

# One pytest process per backend (Keras fixes the backend at import), and the
# cross-backend tests once (their workers are subprocesses). Those two lanes
# run side by side: each pytest process is mostly one busy core (eager op
# dispatch, compiles), so on a 2-core machine the lanes overlap well. The
# background lane runs the cross-backend tests, then the other-kernels lane
# (below), so the two lanes take about as long (issue 21's tests: 19.3 + 4.7
# min beside 3.8 + 4.2 + 12.7 min for TensorFlow, torch and JAX, from a
# fresh clone; docs/architecture.md). It writes to logs, printed
# when both are done. Every run happens even if one fails; the target
# fails if any did. No test asserts speed, so the overlap changes no verdict.
LOGS := .test-logs
# The other-kernels lane: the tests marked machine_sensitive (stored numbers,
# float budgets against this machine's float64 oracle) again under each
# setting of tests/kernels.py, which forces the frameworks' CPU kernels (and
# NumPy's BLAS) onto other code paths: another machine on this one (1-2 min).
KERNEL_SETTINGS ?= avx2 avx
OTHER_KERNELS = for s in $(KERNEL_SETTINGS); do for b in $(BACKENDS); do \
	  echo "=== other kernels: $$s, KERAS_BACKEND=$$b ==="; \
	  $(PY) tests/kernels.py $$s -- env KERAS_BACKEND=$$b $(PY) -m pytest -q -m machine_sensitive \
	    tests --ignore=tests/consistency || failed="$$failed $$s:$$b"; \
	done; done

# Lint, format and types, first in `make test`: they fail in seconds, before
# the 20-minute suite starts. mypy's settings (what each package is held to)
# are in pyproject.toml.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The JAX lane's tests compile thousands of tiny XLA programs (every eager op
# at every new shape: compiling, not computing, is its time). XLA's CPU
# backend at optimisation level 0 compiles them faster (measured back to
# back: tests/layers/test_gradients.py 117 s against 174 s; the lane from a
# fresh clone: docs/architecture.md). Every verdict is a budget or an exact
# fact that holds under any code generation (all pass under both). JAX with its
# default flags still runs everywhere else: the cross-backend matrix (every
# built-in case, forward, gradients, jit, saves), the other-kernels lane,
# `make demo` and the bench.
JAX_TEST_XLA_FLAGS ?= --xla_backend_optimization_level=0
# Each lane's log ends with its slowest tests: where the 25 minutes go.
DURATIONS ?= --durations=15

test: lint
	@mkdir -p $(LOGS); rm -f $(LOGS)/matrix.log $(LOGS)/matrix.rc $(LOGS)/kernels.*; \
	( KERAS_BACKEND=numpy $(PY) -m pytest $(DURATIONS) tests/consistency > $(LOGS)/matrix.log 2>&1; \
	  echo $$? > $(LOGS)/matrix.rc; \
	  failed=""; $(OTHER_KERNELS) > $(LOGS)/kernels.log 2>&1; \
	  echo "$$failed" > $(LOGS)/kernels.failed ) & \
	failed=""; \
	for b in $(BACKENDS); do \
	  echo "=== KERAS_BACKEND=$$b ==="; \
	  XLA_FLAGS="$$(if [ $$b = jax ]; then echo "$(JAX_TEST_XLA_FLAGS) "; fi)$$XLA_FLAGS" \
	    KERAS_BACKEND=$$b $(PY) -m pytest $(DURATIONS) tests --ignore=tests/consistency \
	    || failed="$$failed $$b"; \
	done; \
	wait; \
	echo "=== cross-backend tests (ran alongside the above) ==="; \
	cat $(LOGS)/matrix.log; \
	[ "$$(cat $(LOGS)/matrix.rc 2>/dev/null)" = 0 ] || failed="$$failed matrix"; \
	echo "=== other kernels (ran alongside, after the cross-backend tests) ==="; \
	cat $(LOGS)/kernels.log; \
	[ -f $(LOGS)/kernels.failed ] || failed="$$failed other-kernels:no-result"; \
	failed="$$failed$$(cat $(LOGS)/kernels.failed 2>/dev/null)"; \
	if [ -n "$$failed" ]; then echo "FAILED:$$failed"; exit 1; fi; \
	echo "all passed: $(BACKENDS), on other kernels ($(KERNEL_SETTINGS)), and the cross-backend matrix"

# The fast lane, while developing: lint, then one backend's tests that are not
# marked slow, and the cross-backend tests that start no worker (under the
# numpy backend). About 2 minutes; `make test` stays the whole proof.
FAST_BACKEND ?= tensorflow
test-fast: lint
	KERAS_BACKEND=$(FAST_BACKEND) $(PY) -m pytest -q -m "not slow" tests --ignore=tests/consistency
	KERAS_BACKEND=numpy $(PY) -m pytest -q -m "not slow" tests/consistency

test-other-kernels: $(STAMP)
	@failed=""; $(OTHER_KERNELS); \
	if [ -n "$$failed" ]; then echo "FAILED:$$failed"; exit 1; fi; \
	echo "all passed on other kernels: $(KERNEL_SETTINGS) x $(BACKENDS)"

# The docs site (mkdocs, Material theme, API pages from the docstrings) into
# site/. --strict, as in tests/test_docs.py and CI: a broken link or anchor, a
# page missing from the nav, or an API page whose object is gone fails it.
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) $(LOGS) example-out build site src/*.egg-info
