# The two commands: `make demo` (train -> export -> serve -> predict -> metrics, offline)
# and `make test`. Both create .venv and install what they need on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SRC    := pyproject.toml

.PHONY: demo test lint format install weights proto docs tools image clean

$(STAMP): $(SRC)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[serve,train,dev]'
	touch $(STAMP)

install: $(STAMP)

weights: $(STAMP)
	PY=$(PY) bash scripts/fetch_weights.sh

demo: install weights
	PY=$(PY) bash scripts/demo.sh

lint: $(STAMP)  ## ruff (lint + format check) and mypy, configured in pyproject.toml
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: install weights lint
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

proto: $(STAMP)
	$(PY) scripts/gen_proto.py

docs: $(STAMP)  ## regenerate the flag table in docs/server-contract.md from server/settings.py
	$(PY) scripts/gen_settings_doc.py

tools:  ## install the ops tools the validation tests use (helm, promtool, hadolint, ...)
	bash scripts/install_tools.sh

TARGET ?= cpu
image:  ## build the tlserve:$(TARGET) image (cpu or trainer) with podman; see docs/deployment.md
	bash scripts/build_image.sh $(TARGET)

clean:
	rm -rf $(VENV) runs models data demo-out .pytest_cache
