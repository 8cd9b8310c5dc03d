# Two commands on a fresh machine: `make demo` and `make test`.
# torch==2.13.0 is installed first: on these machines it is a CPU build lying on disk,
# whereas an unpinned torch would pull a multi-GB CUDA build. --no-compile: pip does not
# byte-compile every installed module (about 50 s on a 2-core machine); Python compiles and
# caches the ones imported, on first import.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test clean

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile torch==2.13.0
	$(PY) -m pip install -q --no-compile -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m meganeura compile --model gemma4-small-test --seq-len 16 --run

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -n 2 --dist worksteal

clean:
	rm -rf $(VENV) build *.egg-info
