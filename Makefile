# directord: the commands README.md and .ci/run use.
#
#   make demo    start a throwaway local cluster and run the sample orchestration
#   make test    the whole test suite (unit, integration, end-to-end) with branch coverage;
#                it first installs and starts what the tests need (.ci/setup)
#   make fuzz    the hypothesis fuzzers against live listeners, long (5000 examples each)
#   make check   ruff lint, ruff format check, mypy --strict
#   make bench   the throughput benchmark (bench/throughput.py), the CLI's start-up
#                (bench/cli_start.py), what a job's process costs by how it is
#                started (bench/spawn_strategies.py), one deadline sweep over deep
#                queues (bench/sweep.py), and a restart's read of a long history
#                (bench/restart.py)
#   make soak    30 minutes of orchestrations under SIGKILLs (bench/soak.py)
#
# Every target first makes sure .venv exists and holds directord with its dev
# dependencies; it is rebuilt when pyproject.toml changes. Only python3 (>= 3.11,
# with its venv module) and make are needed.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
# The end-to-end tests mostly wait on processes and sockets: four workers on two
# cores halve the run (each module, with its clusters, stays on one worker).
PYTEST_WORKERS ?= 4

.PHONY: all demo test fuzz setup check bench soak venv clean

all: check test

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "directord needs Python >= 3.11 (found $$($(PYTHON) --version))" >&2; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || \
	  { echo "'$(PYTHON) -m venv' failed; on Debian/Ubuntu: apt-get install python3-venv" >&2; \
	    rm -rf $(VENV); exit 1; }
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@# The editable install leaves src/ without .pyc files; where PYTHONDONTWRITEBYTECODE
	@# is set, every run would compile directord again (tens of ms per CLI command).
	$(BIN)/python -m compileall -q src >/dev/null
	@touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/directord demo

setup:
	@PYTHON=$(PYTHON) bash .ci/setup

test: $(STAMP) setup
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadscope \
	  --cov=directord --cov-branch --cov-report=term $(PYTEST_ARGS)

fuzz: $(STAMP) setup
	$(BIN)/python -m pytest -m fuzz --hypothesis-profile fuzz $(PYTEST_ARGS)

# All three run even when one fails, so one run reports every problem.
check: $(STAMP)
	@status=0; \
	for cmd in "$(BIN)/ruff check src tests bench examples" \
	           "$(BIN)/ruff format --check src tests bench examples" \
	           "$(BIN)/mypy --strict src"; do \
	  echo "$$cmd"; $$cmd || status=1; \
	done; exit $$status

bench: $(STAMP)
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/cli_start.py
	$(BIN)/python bench/spawn_strategies.py
	$(BIN)/python bench/sweep.py
	$(BIN)/python bench/restart.py

# Mixed orchestrations while clients and the server are SIGKILLed (30 minutes by
# default; SOAK_ARGS='--minutes 2' for a short one). Exits 1 if a job ran twice,
# out of order, or never ended.
soak: $(STAMP) setup
	$(BIN)/python bench/soak.py $(SOAK_ARGS)

# The documentation site from docs/ and mkdocs.yml into site/; --strict makes a
# broken link or anchor an error. Nothing is fetched from the network.
.PHONY: docs
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage .coverage.* htmlcov
