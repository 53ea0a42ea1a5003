# Two commands matter: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
CONFIG ?= config.yml

.PHONY: install run test lint system-deps diagrams bench fuzz clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Editable "compat" mode puts the checkout on sys.path, which is how Twisted finds
# twisted/plugins/pbx_plugin.py for `twistd pbx`.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[test,wizard]' --config-settings editable_mode=compat
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/pbx run --config $(CONFIG)

# SIPp (Debian sip-tester) is the real SIP peer of the integration tests.
system-deps:
	sh scripts/install_system_deps.sh

test: install system-deps
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .

diagrams: install
	$(BIN)/python scripts/generate_statecharts.py

bench: install
	$(BIN)/python scripts/bench_sip_codec.py --worst
	$(BIN)/python scripts/bench_transactions.py
	$(BIN)/python scripts/bench_registrar.py

# Coverage-guided fuzzing of the SIP/SDP codec (atheris); corpus under var/fuzz/.
MINUTES ?= 30
fuzz: install
	$(BIN)/python scripts/fuzz_sip.py --minutes $(MINUTES) --target all

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis
