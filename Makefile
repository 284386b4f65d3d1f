# Two commands do all set-up on a fresh machine:
#   make demo   -- installs into .venv and runs the main job on embedded data
#   make test   -- installs into .venv (with test extras) and runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fslt demo $(ARGS)

test: $(STAMP)
	OUTDATED_IGNORE=1 HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/step_time.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
