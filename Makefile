# The two commands of the README: `make repro` (set up, then run the pipeline) and `make test`.
# Both create the venv inside the repo on first use and reinstall when requirements.txt changes.
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export TOKENIZERS_PARALLELISM := false
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup repro test
setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

repro: setup
	python -m flows.mlflow_record repro   # dvc repro, grouped as one MLflow pipeline run

# Two pytest-xdist workers, a whole module per worker at a time (its module fixtures run once), in
# the order tests/conftest.py gives: the modules that run the smoke pipeline first.
test: setup
	pytest -q --durations=10 -n 2 --dist loadscope --no-loadscope-reorder tests

# Mutation testing (not part of `make test`): tests/mutate.py runs mutmut (pinned in
# requirements-mutate.txt) group by group over the modules the results rest on, each group's
# mutants against the tests of its modules only ([tool.ptf-mutate] in pyproject.toml: the fast,
# targeted tests/test_*_mutants.py first, so that most mutants stop at their first failing test;
# tests too slow to run per mutant deselected; the survivors judged equivalent listed with why),
# in scratch copies under $(MUTATE_DIR), so nothing lands in the work tree. It prints per module
# the score killed / (tried - equivalent), the group's wall time and CPU time per core (the wall
# time depends on what else runs on the machine), and every mutant not killed.
# `make mutate` runs the groups not marked optional (under 30 minutes on 2 cores), `make mutate-all`
# every group (over 2 hours), `make mutate GROUPS="cl_metrics forgetting"` those named; the diff of
# one mutant:
# `make mutate-show G=cl_metrics M=<mutant name>`; `make mutate-report` prints the table again
# from the last run (after judging more survivors equivalent), without rerunning.
MUTATE_DIR ?= $(or $(TMPDIR),/tmp)/ptf-mutate
GROUPS ?=
.PHONY: mutate mutate-all mutate-show mutate-report
$(VENV)/.mutate-installed: $(VENV)/.installed requirements-mutate.txt
	$(BIN)/pip install --quiet --disable-pip-version-check -c requirements.txt -r requirements-mutate.txt
	touch $@

mutate: $(VENV)/.mutate-installed
	python tests/mutate.py --dir $(MUTATE_DIR) $(GROUPS)

mutate-show: $(VENV)/.mutate-installed
	cd $(MUTATE_DIR)/$(G) && $(CURDIR)/$(BIN)/mutmut show $(M)

mutate-all: $(VENV)/.mutate-installed
	python tests/mutate.py --all --dir $(MUTATE_DIR)

mutate-report: $(VENV)/.mutate-installed
	python tests/mutate.py --report --dir $(MUTATE_DIR) $(GROUPS)

.PHONY: dashboard schedule results screenshots
dashboard: setup   # the MLflow UI on http://127.0.0.1:5000 over mlflow.db; prints the pages to open
	python -m flows.dashboard

schedule: setup    # serve the nightly deployment of prefect.yaml from this process
	python -m flows.deploy

results: setup     # docs/results.md + docs/figures from the current (clean) run
	python -m scripts.results

# The smoke pipeline's screenshots (its MLflow landing page and runs table, and `dvc plots show`
# with the network off, in headless Chromium; Debian: apt-get install chromium), each checked
# through the page's DOM (tests/test_dashboard.py; about 6 minutes). They go to $(SHOTS), not to
# docs/screenshots/: the README's come from the default run (python -m scripts.screenshots_default).
SHOTS ?= $(or $(TMPDIR),/tmp)/ptf-screenshots
screenshots: setup
	PTF_SCREENSHOTS=$(SHOTS) pytest -q -p no:cacheprovider tests/test_dashboard.py
