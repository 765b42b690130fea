# MistRelay — `make run` starts the service, `make test` runs the test suite.
# Both install what is missing first: Debian packages (when run as root) and a virtualenv in .venv/.

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
RUN_PACKAGES := aria2 rclone ffmpeg unar zstd
TEST_PACKAGES := $(RUN_PACKAGES) chromium postgresql zip
# For the docker tests (they skip without a Docker daemon): installed when make runs as root.
DOCKER_PACKAGES := docker.io debootstrap
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
	@if [ "$$(id -u)" = 0 ]; then sh scripts/install-system.sh $(DOCKER_PACKAGES); fi

run: system-run $(VENV)/.runtime
	$(VPY) app.py

# Starts dockerd for the run when it is installed and not running, and stops it at the end.
test: system-test $(VENV)/.dev
	sh scripts/with-dockerd.sh $(VPY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy app.py client_cli.py cluster.py configer.py db.py events.py files.py importer.py metrics.py records.py settings_editor.py aria2_client uploads webstreamer bot

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
