# The two entry points of the README, and what they need.
#   make demo  - install everything, boot the local sandbox host, provision it and deploy the
#                example app over HTTPS
#   make test  - install everything, run all tests (unit and real-host)
PY ?= python3
VENV := .venv
SYSTEM_PACKAGES := debootstrap systemd-container tinyproxy iproute2 openssh-client pebble
FAB := $(VENV)/bin/fab

.PHONY: setup system-deps demo test lint sandbox-down bench

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

test: setup
	$(VENV)/bin/pytest -ra

lint: setup
	$(VENV)/bin/ruff check .

sandbox-down: setup
	$(FAB) sandbox.down

bench: setup
	$(VENV)/bin/python bench/run.py
