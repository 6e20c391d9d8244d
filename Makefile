# Two entry points, both self-installing into .venv (see README).
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# tests/test_label_studio.py starts a real Label Studio: pip's label-studio in its own venv
# (the script does nothing when that venv has the version it pins).
LS_VENV := .venv-label-studio
$(LS_VENV)/.installed: labeling/label_studio_env.sh
	bash labeling/label_studio_env.sh

.PHONY: demo test
demo: $(VENV)/.installed
	$(VENV)/bin/rlhf run --config configs/demo.yaml

test: $(VENV)/.installed $(LS_VENV)/.installed
	$(PY) -m pytest -q tests
