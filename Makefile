# The two entry points of the README, and what they need.
#   make demo  - install everything, boot the local sandbox host, provision it and deploy the
#                example app over HTTPS
#   make test  - install everything, run all tests (unit, then real-host on Debian 12 and 13)
#   make unit  - the unit tests only (no root, no sandbox)
PY ?= python3
VENV := .venv
# Every program the tests, the sandbox, the demo and the bench start on this machine comes from
# one of these (tests/test_setup.py keeps it so).
SYSTEM_PACKAGES := debootstrap systemd-container tinyproxy-bin iproute2 openssh-client pebble \
	rsync git curl openssl shellcheck
FAB := $(VENV)/bin/fab

.PHONY: setup system-deps demo test unit lint sandbox-down bench

setup: system-deps $(VENV)/.installed

system-deps:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg-query -W -f='$${db:Status-Abbrev}' $$p 2>/dev/null | grep -q '^ii' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:" $$missing; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

demo: setup
	$(FAB) sandbox.demo

# The unit tests, then the real-host tests on a fresh sandbox of each supported Debian release.
test: setup
	$(VENV)/bin/pytest -ra -m 'not realhost'
	FABSTACK_TEST_SUITE=bookworm $(VENV)/bin/pytest -ra -m realhost
	FABSTACK_TEST_SUITE=trixie $(VENV)/bin/pytest -ra -m realhost

# The fast tests alone: no root, no sandbox, a few seconds.
unit: $(VENV)/.installed
	$(VENV)/bin/pytest -ra -m 'not realhost'

lint: setup
	$(VENV)/bin/ruff check .

sandbox-down: setup
	$(FAB) sandbox.down

# The bench's peers (pyinfra, Ansible) come from the `bench` extra of pyproject.toml.
$(VENV)/.bench-installed: $(VENV)/.installed
	$(VENV)/bin/pip install -q -e '.[dev,bench]'
	touch $@

bench: setup $(VENV)/.bench-installed
	$(VENV)/bin/python bench/run.py
