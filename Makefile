# The two commands a newcomer runs: `make demo` and `make test` (see README.md).
# Both work on a fresh Debian 12 machine as root and are quiet when everything is already there.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Debian packages of the real peers the tests run against (see tests/peers/).
DEBS  := qemu-system-common dpdk-dev user-mode-linux kmod gcc libxen-dev linux-libc-dev fio

.PHONY: test demo deps venv bench clean
test: deps venv
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

demo: deps venv
	$(PY) -m xen_vhost_master.demo

deps:
	@bash scripts/install-debs.sh $(DEBS)

venv: $(STAMP)
$(STAMP): pyproject.toml
	@command -v python3 >/dev/null || bash scripts/install-debs.sh python3
	@python3 -c 'import ensurepip' 2>/dev/null || bash scripts/install-debs.sh python3-venv
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

clean:
	rm -rf $(VENV) build *.egg-info
