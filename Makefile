# MistRelay — `make run` starts the service, `make test` runs the test suite.
# Both install what is missing first: Debian packages (when run as root) and a virtualenv in .venv/.

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
RUN_PACKAGES := aria2 rclone ffmpeg
TEST_PACKAGES := $(RUN_PACKAGES) chromium postgresql
PYTEST_ARGS ?=

.PHONY: run test lint system-run system-test clean

$(VENV)/.runtime: requirements.txt
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt $(VENV)/.runtime
	$(VPY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

system-run:
	@sh scripts/install-system.sh $(RUN_PACKAGES)

system-test:
	@sh scripts/install-system.sh $(TEST_PACKAGES)

run: system-run $(VENV)/.runtime
	$(VPY) app.py

test: system-test $(VENV)/.dev
	$(VPY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy app.py cluster.py configer.py db.py events.py files.py metrics.py records.py aria2_client uploads webstreamer bot

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
