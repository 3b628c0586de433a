# wanpack developer entry points. `make demo` and `make test` work on a fresh machine: they create .venv and
# install everything first. torch is installed before the project so a CPU-only box takes the pinned CPU build
# instead of resolving `torch>=2.5` to a multi-GB CUDA build; override TORCH_SPEC on a GPU box.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo-out
PYTEST_ARGS ?=

.PHONY: install demo test lint unit wheel-check bench-convert clean bench-encoders

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	mkdir -p $(DEMO_DIR)
	WANPACK_CACHE=$(DEMO_DIR)/cache $(BIN)/wanpack run --overwrite --out $(DEMO_DIR)/demo.mp4
	$(BIN)/wanpack inspect $(DEMO_DIR)/cache/demo-*/pack

lint: $(STAMP)
	$(BIN)/ruff check .

unit: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Build the wheel, install it into a fresh venv, and run the CLI from there (proves the folder mapping ships).
wheel-check: $(STAMP)
	rm -rf build/wheel-check && mkdir -p build/wheel-check
	$(BIN)/python -m pip wheel -q --no-deps --no-build-isolation -w build/wheel-check/dist .
	$(PYTHON) -m venv build/wheel-check/venv
	build/wheel-check/venv/bin/python -m pip install -q "$(TORCH_SPEC)"
	build/wheel-check/venv/bin/python -m pip install -q build/wheel-check/dist/wanpack-*.whl
	cd build/wheel-check && venv/bin/wanpack --help > /dev/null
	cd build/wheel-check && venv/bin/wanpack synth --arch wan2.1-t2v-14b --dim-scale tiny --layers 2 --out src
	cd build/wheel-check && venv/bin/wanpack convert src --arch wan2.1-t2v-14b --quant int8 --save-by-block --out pack
	cd build/wheel-check && venv/bin/wanpack verify pack
	@echo "wheel-check: installed wheel converted and verified a pack"

test: lint unit wheel-check

bench-convert: $(STAMP)
	$(BIN)/python benchmarks/convert_bench.py

clean:
	rm -rf $(VENV) build dist $(DEMO_DIR) .pytest_cache .ruff_cache

bench-encoders: $(STAMP)
	$(BIN)/python benchmarks/encoders_bench.py
