# Two entry points, both self-installing into .venv (see README).
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

.PHONY: demo test
demo: $(VENV)/.installed
	$(VENV)/bin/rlhf run --config configs/demo.yaml

test: $(VENV)/.installed
	$(PY) -m pytest -q tests
