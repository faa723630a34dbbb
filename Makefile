# make demo: compress the bundled LeNet-5 and print its report.  make test: the test suite.
# make lint: ruff (lint + format check) and mypy.  make format: apply ruff's fixes and format.
# make bench-smoke: every tool in tools/ on the bundled sample, in seconds each.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEV_STAMP := $(VENV)/.dev-stamp
BENCH_STAMP := $(VENV)/.bench-stamp
LINTED := onnxhq tests tools models

.PHONY: demo test test-all test-latest-ort lint format bench-smoke clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,plot]'
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,plot,dev]'
	touch $(DEV_STAMP)

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,plot,bench]'
	touch $(BENCH_STAMP)

demo: $(STAMP)
	$(VENV)/bin/onnxhq compress models/lenet5_mnist.onnx --data models/mnist_sample.npz \
	    --eval models/mnist_sample.npz -o out/lenet5 --report-json out/lenet5/report.json
	$(VENV)/bin/onnxhq decode out/lenet5/lenet5_mnist.onnx -o out/lenet5/lenet5_mnist.decoded.onnx
	$(VENV)/bin/onnxhq eval out/lenet5/lenet5_mnist.decoded.onnx --data models/mnist_sample.npz

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

# All three checks run, so one pass shows every finding; the target fails if any of them does.
lint: $(DEV_STAMP)
	@status=0; \
	$(PY) -m ruff check $(LINTED) || status=1; \
	$(PY) -m ruff format --check $(LINTED) || status=1; \
	$(PY) -m mypy onnxhq || status=1; \
	exit $$status

format: $(DEV_STAMP)
	$(PY) -m ruff check --fix $(LINTED)
	$(PY) -m ruff format $(LINTED)

# Each tool with --smoke (module:argument where it takes one), its output in out/bench-smoke/;
# a tool with a main and no entry here fails the target, so a new tool cannot miss its smoke run.
SMOKE_RUNS := bench_coding bench_e2e bench_hessian bench_quantize dump_index_streams \
	make_mnist_sample reproduce_table train_mnist:lenet5 train_mnist:lenet300
bench-smoke: $(BENCH_STAMP)
	@for f in tools/*.py; do \
	    m=$$(basename $$f .py); grep -q '__main__' $$f || continue; \
	    case " $(SMOKE_RUNS) " in *" $$m "*|*" $$m:"*) ;; \
	    *) echo "$$f has no smoke run in the Makefile's SMOKE_RUNS"; exit 1 ;; esac; \
	done
	@mkdir -p out/bench-smoke
	@for run in $(SMOKE_RUNS); do \
	    m=$${run%%:*}; arg=$${run#$$m}; arg=$${arg#:}; log=out/bench-smoke/$$m$${arg:+_$$arg}.log; \
	    start=$$(date +%s); \
	    $(PY) -m tools.$$m $$arg --smoke > $$log 2>&1 || { cat $$log; echo "FAILED: $$run"; exit 1; }; \
	    echo "ok  tools.$$m$${arg:+ $$arg} --smoke ($$(( $$(date +%s) - start )) s)"; \
	done
	@PYTHON=$(PY) bash tools/new_user_transcript.sh --smoke > out/bench-smoke/transcript.md \
	    || { cat out/bench-smoke/transcript.md; echo "FAILED: new_user_transcript.sh"; exit 1; }
	@echo "ok  tools/new_user_transcript.sh --smoke"

# The decoded graphs must also run in the newest onnxruntime release. The training build provides
# the `onnxruntime` module too, so the newest release gets its own environment.
LATEST := .venv-ort-latest
test-latest-ort:
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST)/bin/python -m pip install --quiet --upgrade onnxruntime onnx numpy protobuf pytest hypothesis
	$(LATEST)/bin/python -m pip install --quiet --no-deps -e .
	$(LATEST)/bin/python -c "import onnxruntime; print('onnxruntime', onnxruntime.__version__)"
	$(LATEST)/bin/python -m pytest -q tests/test_deploy.py

clean:
	rm -rf out .pytest_cache .hypothesis .mypy_cache .ruff_cache
