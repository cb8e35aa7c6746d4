# arrag: two commands on a fresh machine.
#   make test   create .venv if missing, install arrag with its dev, train, eval, data and app extras, run the tests
#   make demo   same set-up, then run the main job on the embedded default (TailWorld;
#               make demo ARGS="--world shapes" for ShapesWorld)
# On a machine without CUDA the venv gets the CPU torch wheel (never a multi-GB CUDA build) and faiss-cpu.
# On a CUDA machine it gets PyPI's CUDA torch and GPU FAISS (faiss-gpu-cu12 replaces faiss-cpu).

PYTHON ?= python3
VENV ?= .venv
EXTRAS ?= dev,train,eval,data,app
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
FAISS_GPU ?= faiss-gpu-cu12
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# 1 when a CUDA driver answers; `make CUDA=0 ...` forces the CPU set-up.
CUDA ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
STAMP := $(VENV)/.installed-$(EXTRAS)-cuda$(CUDA)

.PHONY: install test demo lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# Asked of pip's records, not by importing torch: numpy is not installed yet, and torch would warn about it.
	@if ! $(PY) -c "import importlib.metadata as m; m.version('torch')" 2>/dev/null; then \
	  if [ "$(CUDA)" = "1" ]; then \
	    echo "arrag: CUDA found, installing torch==$(TORCH_VERSION) (CUDA build)"; \
	    $(PIP) install "torch==$(TORCH_VERSION)"; \
	  else \
	    echo "arrag: no CUDA, installing the CPU build of torch==$(TORCH_VERSION)"; \
	    $(PIP) install "torch==$(TORCH_VERSION)+cpu" 2>/dev/null || \
	      $(PIP) install "torch==$(TORCH_VERSION)" --index-url $(TORCH_CPU_INDEX); \
	  fi; \
	fi
	@# Pin the torch just installed, so no dependency (accelerate, peft, ...) can swap in another build.
	$(PY) -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > $(VENV)/torch-constraint.txt
	$(PIP) install -c $(VENV)/torch-constraint.txt -e ".[$(EXTRAS)]"
	@if [ "$(CUDA)" = "1" ] && ! $(PY) -c "import faiss, sys; sys.exit(not hasattr(faiss, 'StandardGpuResources'))" 2>/dev/null; then \
	  echo "arrag: CUDA found, replacing faiss-cpu with $(FAISS_GPU)"; \
	  $(PIP) uninstall -y faiss-cpu && $(PIP) install -c $(VENV)/torch-constraint.txt $(FAISS_GPU); \
	fi
	@touch $@

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	$(VENV)/bin/arrag demo $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check arrag tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
