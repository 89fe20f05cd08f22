# Two commands for a new machine; each makes .venv and installs what it needs first.
#   make demo   the main job: a model served, several workers attached, memory and latency
#   make test   the test suite (what CI runs)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test install bench bytecode clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# constraints.txt pins torch to the CPU build; unpinned, pip would fetch a CUDA build of several GB
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,bench]'
	# a trained checkpoint shipped with its own model class (tests/test_own_classes.py); its
	# metadata says Python <=3.11 (3.11.0 to pip), so it cannot be in the test extra
	$(PY) -m pip install --quiet --no-deps --ignore-requires-python 'unidic-lite-imitator-transformers==0.2.1'
	# AntiBERTy's trained checkpoint (tests/test_own_classes.py): antiberty 1.0.0 (the test extra)
	# holds the class, which transformers 5 loads, and reads its weights from the package's
	# trained_models/ folder; the wheel of 0.1.3 ships that folder (97 MB)
	$(PY) -m pip download --quiet --no-deps --dest $(VENV)/wheels 'antiberty==0.1.3'
	$(PY) -c 'import importlib.util as u, os, sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); \
	  site = os.path.dirname(u.find_spec("antiberty").submodule_search_locations[0]); \
	  [z.extract(n, site) for n in z.namelist() if n.startswith("antiberty/trained_models/")]' \
	  $(VENV)/wheels/antiberty-0.1.3-py3-none-any.whl
	touch $(STAMP)

# weightd's bytecode cached, as installing a wheel leaves it: where Python may not write it
# ($$PYTHONDONTWRITEBYTECODE) every fresh worker would compile each module again (~15 ms of a
# 19 ms import). Only what changed is compiled again (~0.1 s otherwise).
bytecode: $(STAMP)
	$(PY) -m compileall -q weightd client

install: bytecode

demo: bytecode
	$(VENV)/bin/weightd demo

# Test files run in parallel (pytest-xdist), each file on one worker: a module's shared daemon
# or Ray cluster is started once. Every test has its own instance, socket and segments. One
# worker more than the cores, at most 4: tests also wait (a daemon starting, a deadline), and
# a third worker fills those waits on 2 cores (8 files: 116 s with 2 workers, 106 s with 3).
TEST_WORKERS ?= $(shell n=$$(nproc); echo $$((n < 4 ? n + 1 : 4)))
test: bytecode
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: bytecode
	$(PY) benchmarks/attach.py

clean:
	rm -rf $(VENV) build *.egg-info
