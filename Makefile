# Cairn: `make demo` and `make test` set everything up on a fresh machine (Python 3.11 and pip needed).
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
GPU    ?= 0
STAMP  := $(VENV)/.cairn-setup-gpu$(GPU)
PIP    := $(BIN)/python -m pip --disable-pip-version-check
export TF_CPP_MIN_LOG_LEVEL ?= 2
export PYTHONDONTWRITEBYTECODE = 1

.PHONY: setup demo test test-fast fuzz bench bench-scale bench-plan porto lint browser clean help

help:
	@echo "make setup   create $(VENV) with the pinned dependencies (GPU=1 for the CUDA builds of TF and FAISS)"
	@echo "make demo    synthetic landmarks + the baseline/deep comparison; outputs in ./demo"
	@echo "make test    the test suite (CI runs this)"
	@echo "make fuzz    a longer, fresh fuzzing of the manifest reader and image loader (CI runs a short, fixed one)"
	@echo "make bench   benchmarks; figures in BENCHMARKS.md and bench/results.json"
	@echo "make bench-scale  3,200 and 20,000 synthetic images through every method, and cairn plan's projections"
	@echo "make bench-plan   cairn plan's million-image projection, this checkout against a baseline commit"
	@echo "make porto   the real-data checks on ../shared/data/porto (leave-one-out; open set), into BENCHMARKS.md"
	@echo "make lint    ruff, and the import contracts of the layers (import-linter; README \"Layout\")"
	@echo "make browser install Debian's chromium (headless, for the HTML report tests) when it is missing"
	@echo "make clean   remove outputs and caches (keeps $(VENV)); 'make clean-all' removes it too"

setup: $(STAMP)

# Re-runs only when the pins change; otherwise `make setup` is a no-op.
$(STAMP): pyproject.toml requirements.lock requirements-dev.lock requirements-dataflow.lock requirements-gpu.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c 'import sys; assert sys.version_info[:2] == (3, 11), "Cairn needs Python 3.11; set PYTHON=..."'
ifeq ($(GPU),1)
	grep -v -E '^(faiss-cpu|tensorflow-cpu|tensorflow_cpu)==' requirements.lock > $(VENV)/requirements-gpu.lock
	$(PIP) uninstall -y -q faiss-cpu tensorflow-cpu 2>/dev/null || true
	$(PIP) install -q -r $(VENV)/requirements-gpu.lock -r requirements-dev.lock -r requirements-dataflow.lock \
		-r requirements-gpu.txt
else
	$(PIP) uninstall -y -q faiss-gpu tensorflow 2>/dev/null || true
	$(PIP) install -q -r requirements.lock -r requirements-dev.lock -r requirements-dataflow.lock
endif
	$(PIP) install -q --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.cairn-setup-gpu*
	@touch $@
	@echo "setup: $(VENV) is ready ($$($(BIN)/python --version), GPU=$(GPU))"

# the ImageNet MobileNet the project is lent: cnn-pretrained's model and cnn's initial weights, when it is there
PRETRAINED ?= ../shared/weights/mobilenet_v1_1.0_224_quant_embedding_extractor.tflite

demo: setup
	$(BIN)/cairn demo --out demo $(if $(wildcard $(PRETRAINED)),--pretrained $(PRETRAINED))

test: setup
	@$(MAKE) --no-print-directory browser || echo "make test: no chromium (needs apt as root or sudo); the report's browser test will be skipped"
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# CI runs 150 examples per fuzz test with a fixed seed; this searches 5,000 new ones per test
fuzz: setup
	CAIRN_FUZZ_EXAMPLES=5000 CAIRN_FUZZ_RANDOM=1 $(BIN)/python -m pytest -q tests/pipeline/test_fuzz.py

bench: setup
	$(BIN)/python -m bench.run

# 3,200 and 20,000 synthetic images through every method (about an hour and a half on 2 cores), then
# `cairn plan`'s projections of those runs and of a million images; figures in BENCHMARKS.md (section "scale")
bench-scale: setup
	$(BIN)/python -m bench.run --only scale

# `cairn plan`'s million-image projection with this checkout and with bench/bench_plan.py's BASELINE commit, in
# one run, twice each in the order baseline, this, this, baseline; then the extraction jobs of the last sample with
# either commit's code in turn (section "plan" of BENCHMARKS.md; about an hour)
bench-plan: setup
	$(BIN)/python -m bench.run --only plan

# leave-one-out retrieval and kNN accuracy on the shared Porto photos, and the open-set rounds (one landmark held
# out of the database per round: GAP, accuracy and AUC beside the plain top-1 rule)
porto: setup
	$(BIN)/python -m bench.run --only porto --only open_set

lint: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports --no-cache

# headless Chromium for tests/reports (skipped there without it unless CAIRN_REQUIRE_BROWSER=1); apt as root or sudo
browser:
	@command -v chromium >/dev/null || { \
		if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo -n"; fi; \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q \
			--no-install-recommends chromium fonts-dejavu-core; \
	}
	@chromium --version

clean:
	rm -rf demo out runs bench/out test-artifacts .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -not -path "./$(VENV)/*" -exec rm -rf {} +

clean-all: clean
	rm -rf $(VENV)
