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

# pip-audit lives in its own venv: its dependencies are not ours, and must not be audited or
# resolved as if they were.
TOOLS ?= .venv-tools
$(TOOLS)/.installed:
	python3 -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install -q pip-audit==2.10.1
	touch $@

.PHONY: demo test audit
demo: $(VENV)/.installed
	$(VENV)/bin/rlhf run --config configs/demo.yaml

test: $(VENV)/.installed $(LS_VENV)/.installed
	$(PY) -m pytest -q tests

audit: $(VENV)/.installed $(TOOLS)/.installed
	$(TOOLS)/bin/python .ci/audit.py $(VENV)
