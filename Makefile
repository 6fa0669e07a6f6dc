# Everything runs inside a virtual environment in the repository (.venv).
# torch is installed first, alone and pinned, so pip takes the local CPU wheel and the
# package's own `torch>=2.4` is already satisfied (no CUDA build is ever pulled in).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

# LPIPS's linear layers (vggnet.losses.LPIPS, tests/test_losses.py) are a file inside the
# pure-Python lpips wheel: downloaded, never installed (installing it pulls torchvision)
LPIPS_WHEEL := $(VENV)/wheels/lpips-0.1.4-py3-none-any.whl

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(MAKE) --no-print-directory $(LPIPS_WHEEL)
	touch $(STAMP)

$(LPIPS_WHEEL):
	$(PY) -m pip download -q --no-deps lpips==0.1.4 -d $(VENV)/wheels

demo: $(STAMP)
	$(PY) -m vggnet demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

# the second pass runs the CPU-sensitive tests (marked cpu_sensitive) again with oneDNN and
# ATen capped at AVX2, so a machine with AVX-512/bf16 also exercises the AVX2-only path
test: $(STAMP) $(LPIPS_WHEEL) lint
	$(PY) -m pytest
	ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 $(PY) -m pytest -m cpu_sensitive

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
