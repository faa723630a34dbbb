# make demo: compress the bundled LeNet-5 and print its report.  make test: the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-all test-latest-ort clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,plot]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/onnxhq compress models/lenet5_mnist.onnx --data models/mnist_sample.npz \
	    --eval models/mnist_sample.npz -o out/lenet5 --report-json out/lenet5/report.json
	$(VENV)/bin/onnxhq decode out/lenet5/lenet5_mnist.onnx -o out/lenet5/lenet5_mnist.decoded.onnx
	$(VENV)/bin/onnxhq eval out/lenet5/lenet5_mnist.decoded.onnx --data models/mnist_sample.npz

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

# The decoded graphs must also run in the newest onnxruntime release. The training build provides
# the `onnxruntime` module too, so the newest release gets its own environment.
LATEST := .venv-ort-latest
test-latest-ort:
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST)/bin/python -m pip install --quiet --upgrade onnxruntime onnx numpy scipy protobuf pytest hypothesis
	$(LATEST)/bin/python -m pip install --quiet --no-deps -e .
	$(LATEST)/bin/python -c "import onnxruntime; print('onnxruntime', onnxruntime.__version__)"
	$(LATEST)/bin/python -m pytest -q tests/test_deploy.py

clean:
	rm -rf out .pytest_cache .hypothesis
