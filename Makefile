# The two commands a newcomer runs: `make demo` and `make test` (see README.md).
# Both work on a fresh Debian 12 machine as root and are quiet when everything is already there.
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Debian packages of the real peers the tests run against (see tests/peers/): the groups of
# tests/tools/debian-packages.tsv, whose package names depend on the Debian release (12 or 13).
DEBS  := test

.PHONY: test lint test-xen test-xen-full test-xen-x86 test-trixie bench-xen demo deps venv bench fuzz clean deb install
# XVM_REQUIRE_PEERS=1: a peer `make deps` installs and a test cannot find is a failure, not a skip
# (tests/peers/programs.py); -rs prints every skip's reason.
test: deps venv lint
	XVM_REQUIRE_PEERS=1 $(PY) -m pytest -q -rs -p no:cacheprovider $(PYTEST_ARGS)

# ruff and mypy --strict over the three source roots (protocol/, xen_vhost_master/, sim/), with the
# settings of pyproject.toml's [tool.ruff] and [tool.mypy] and the versions pinned in its `test`
# extra. tests/test_static.py runs these same two commands (and checks that they are these).
RUFF := $(PY) -m ruff check --no-cache --output-format concise .
MYPY := $(PY) -m mypy --strict -p vhost_user -p xen_vhost_master -p xen_vhost_sim
lint: venv
	$(RUFF)
	$(MYPY)

# The real-Xen lab alone (arm64 Xen 4.17 + Debian dom0 + domU under qemu-system-aarch64; see
# tests/xenlab/README.md). `make test` runs it too; XENLAB=0 leaves it out.
test-xen: venv
	bash tests/xenlab/run-lab.sh

# The x86 real-Xen scout (x86 Xen 4.17 + Debian amd64 dom0 + an HVM domU under qemu-system-x86_64
# TCG; see tests/xenlab/x86/README.md). Not part of `make test`.
test-xen-x86:
	bash tests/xenlab/x86/run.sh
# The real-Xen scenarios, the heavier ones too, one boot per Xen release (tests/xenlab/README.md):
# Xen 4.20's default set (its generic `virtio = [...]` devices, `grant_usage=1` from xenstore,
# virtio-net through dpdk-testpmd; grantmmap as a fifth guest starved testpmd on a loaded host), then
# Xen 4.17's three with grantmmap, a grant-based guest whose back-end maps the grants itself (XEN_MMAP
# grant regions, kernel fast path). Where the Debian mirror lacks Xen 4.20's source
# (tests/xenlab/README.md) give XENLAB_XEN_SRC=<upstream Xen git repository>, else that boot fails,
# saying so.
# Then the x86 HVM scenarios (tests/xenlab/x86/README.md), one boot each: qemu-storage-daemon through
# shadow virtqueues to a guest using MSI-X, the Python back-end to a guest using INTx (1-vCPU guests:
# a 2-vCPU one, pci-qsd-smp, makes the nested TCG machine segfault processes now and then, see
# there). Every one runs; the target fails if any did.
XENLAB_X86_FULL ?= pci-qsd pci-pyblk-intx
test-xen-full: venv
	rc=0; XENLAB_XEN=4.20 XENLAB_SCENARIOS="pyblk qsd grant net" bash tests/xenlab/run-lab.sh || rc=1; \
	XENLAB_XEN=4.17 XENLAB_SCENARIOS="pyblk qsd grant grantmmap" bash tests/xenlab/run-lab.sh || rc=1; \
	for s in $(XENLAB_X86_FULL); do XENLAB_X86_SCENARIO=$$s bash tests/xenlab/x86/run.sh || rc=1; done; \
	exit $$rc

# `make test` on Debian 13 (trixie) from this host (12 or 13), as root: a cached mmdebstrap root,
# this checkout's committed HEAD cloned into it, chrooted in namespaces of its own, XENLAB=0
# (tests/tools/test-trixie.sh). PYTEST_ARGS narrows it as for `make test`.
test-trixie:
	bash tests/tools/test-trixie.sh $(PYTEST_ARGS)

# The real-Xen benchmark: one boot of the lab, a domU per back-end with a virtio disk
# through the daemon and a Xen PV disk (blkback) side by side; bench-xen-results.json and a table.
# Not part of `make test`.
bench-xen: venv
	XENLAB_BENCH=1 bash tests/xenlab/run-lab.sh

demo: venv
	@bash tests/tools/install-debs.sh demo
	$(PY) -m xen_vhost_sim.tools.demo

deps:
	@bash tests/tools/install-debs.sh $(DEBS)

venv: $(STAMP)
$(STAMP): pyproject.toml
	@command -v python3 >/dev/null || bash tests/tools/install-debs.sh python3
	@python3 -c 'import ensurepip' 2>/dev/null || bash tests/tools/install-debs.sh python3-venv
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	@touch $@

# The Debian package (packaging/build_deb.py): dist/xen-vhost-master_<version>_<arch>.deb, for the
# Debian release it is built on (12 or 13): a private environment under /opt/xen-vhost-master on
# Debian's /usr/bin/python3 with the pinned wheels of packaging/requirements.txt (fetched from PyPI),
# the command, the units, the man page and the docs. Install it with `apt install ./dist/*.deb`.
deb: venv
	$(PY) packaging/build_deb.py deb --out dist

# The same tree without dpkg: `make install DESTDIR=/ PREFIX=/usr` (or a staging DESTDIR).
DESTDIR ?= /
PREFIX  ?= /usr
install: venv
	$(PY) packaging/build_deb.py install --destdir $(DESTDIR) --prefix $(PREFIX)

# BENCH_ARGS: e.g. --plot bench.png (needs the plot extra), --only micro, --reps 1
bench: deps venv
	$(PY) -m xen_vhost_sim.tools.bench $(BENCH_ARGS)

# Long fuzzing runs (each example bounded): 100,000 guest register programs, 100,000 byte streams
# into the vhost-user state machines, 100,000 hostile back-end replies over real sockets, 1,000
# hostile back-end behaviours (storms, slow readers, disconnects) against a device while another
# serves I/O; that run's figures go to fuzz-figures.json (README.md, "Reliability").
fuzz: venv
	HYPOTHESIS_FUZZ_EXAMPLES=100000 XVM_FUZZ_FIGURES=fuzz-figures.json $(PY) -m pytest -q -p no:cacheprovider --timeout=7200 \
	  tests/daemon/test_fuzz_guest.py tests/protocol/test_fuzz_backend_replies.py \
	  "tests/protocol/test_sans_io_pair.py::test_connections_fed_random_chunks_only_raise_library_errors" \
	  tests/daemon/test_fuzz_backend_behaviour.py

clean:
	rm -rf $(VENV) build dist *.egg-info
