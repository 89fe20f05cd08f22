# Two commands for a new machine; each makes .venv and installs what it needs first.
#   make demo   the main job: a model served, several workers attached, memory and latency
#   make test   the test suite (what CI runs)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# constraints.txt pins torch to the CPU build; unpinned, pip would fetch a CUDA build of several GB
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,bench]'
	# weightd's bytecode cached, as installing a wheel leaves it: where Python may not write it
	# ($$PYTHONDONTWRITEBYTECODE) every fresh worker would compile each module again (~13 ms)
	$(PY) -m compileall -q weightd client
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/weightd demo

# Test files run in parallel (pytest-xdist), each file on one worker: a module's shared daemon
# or Ray cluster is started once. Every test has its own instance, socket and segments.
TEST_WORKERS ?= auto --maxprocesses=4
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: $(STAMP)
	$(PY) benchmarks/attach.py

clean:
	rm -rf $(VENV) build *.egg-info
