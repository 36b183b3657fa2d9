# vmtreefs — build, test and run.  GNU make.  `make help` lists the targets.
#
# Every target can be run again: the venv is rebuilt only when pyproject.toml
# changes (stamp .venv/.installed), and deps-system installs Debian packages
# only when one of them is missing.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

PYTHON   ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.installed
BUILD    ?= build
# What `make run` mounts where (relative to the checkout).
STATE    ?= state
MNT      ?= vms
# The vmtreefs that the installed mount helper runs.
VMTREEFS ?= $(CURDIR)/$(BIN)/vmtreefs
HELPER_DEST ?= /sbin/mount.fuse.vmtreefs

SYSTEM_PACKAGES := fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv \
                   xfsprogs btrfs-progs e2fsprogs util-linux attr libvirt-dev \
                   libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients

# Root runs apt-get as it is; anyone else goes through sudo when there is one.
SUDO := $(shell if [ "$$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then echo sudo; fi)
APT_GET ?= $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get

export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PIP_NO_INPUT := 1

.PHONY: help deps deps-system deps-guest venv run test test-guest test-debian crash-test powercut-test fuzz lint bench bench-backup bench-import bench-dmthin bench-lifecycle demo-guest debian-guest install-mount-helper \
        uninstall-mount-helper clean

help: ## list the targets
	@echo "vmtreefs make targets:"
	@grep -E '^[a-zA-Z_-]+:.*## ' $(firstword $(MAKEFILE_LIST)) \
	  | sed -E 's/^([a-zA-Z_-]+):.*## (.*)/\1\t\2/' \
	  | awk -F'\t' '{ printf "  %-22s %s\n", $$1, $$2 }'
	@echo
	@echo "variables: PYTHON=$(PYTHON) VENV=$(VENV) STATE=$(STATE) MNT=$(MNT)"
	@echo "           VMTREEFS=$(VMTREEFS) HELPER_DEST=$(HELPER_DEST)"

deps: deps-system venv ## deps-system + venv

deps-system: ## install the Debian packages (apt-get only if one is missing)
	@missing=""; \
	for p in $(SYSTEM_PACKAGES); do \
	  status=$$(dpkg-query -W -f='$${Status}' "$$p" 2>/dev/null || true); \
	  case "$$status" in *" ok installed") ;; *) missing="$$missing $$p" ;; esac; \
	done; \
	if [ -z "$$missing" ]; then \
	  echo "deps-system: all Debian packages present"; \
	else \
	  if [ "$$(id -u)" -ne 0 ] && [ -z "$(SUDO)" ]; then \
	    echo "deps-system: missing:$$missing; run as root or install sudo" >&2; exit 1; \
	  fi; \
	  echo "deps-system: installing$$missing"; \
	  $(APT_GET) update || { echo "deps-system: apt-get update failed (see above); check the network and /etc/apt/sources.list, then run make again" >&2; exit 1; }; \
	  $(APT_GET) install -y --no-install-recommends $$missing \
	    || { echo "deps-system: apt-get install$$missing failed (see above); fix that and run make again" >&2; exit 1; }; \
	fi

venv: $(STAMP) ## make .venv and pip install -e '.[test]'

# deps-system is order-only: pyfuse3 and libvirt-python compile against the
# Debian headers, but a package check must not force a reinstall of the venv.
$(STAMP): pyproject.toml | deps-system
	@if [ ! -x $(BIN)/python ]; then \
	  echo "$(PYTHON) -m venv $(VENV)"; \
	  $(PYTHON) -m venv $(VENV) || { echo "venv: $(PYTHON) -m venv failed; install python3-venv (make deps-system) or set PYTHON=" >&2; exit 1; }; \
	fi
	@$(BIN)/python -m pip install --upgrade pip || { echo "venv: upgrading pip failed (see above); remove $(VENV) and run make again" >&2; exit 1; }
	@$(BIN)/python -m pip install -e '.[test]' || { echo "venv: pip install -e '.[test]' failed (see above); remove $(VENV) and run make again" >&2; exit 1; }
	@touch $@

run: deps deps-guest ## mount ./state at ./vms in the foreground with a bootable demo VM (Ctrl-C or `.venv/bin/vmtreefs umount vms` stops it)
	bash scripts/run.sh $(BIN)/vmtreefs $(STATE) $(MNT) $(BUILD)/demo

test: deps deps-guest lint ## lint, then every test: dm-thin in a guest (alongside), VMs under libvirt, faults, make run from a fresh clone (~38 min under TCG)
	$(BIN)/python -m pytest -q

deps-guest: venv ## kernel, QEMU, dm/thin tools and virtme-ng for the dm-thin guest tests
	VENV=$(VENV) scripts/guest-deps.sh

test-guest: deps deps-guest ## the dm-thin tests, in a virtme-ng guest with a real dm-thin (~15 min under TCG)
	$(BIN)/python -m pytest -q -m guest tests/dmthin

test-debian: deps deps-guest ## the real Debian guest under libvirt, through the mount: boot, template layout, savestates, disposables, borg backup (~13 min under TCG; as root)
	@command -v borg >/dev/null 2>&1 || $(APT_GET) install -y -q borgbackup
	$(BIN)/python -m pytest -q tests/debian

crash-test: deps deps-guest ## the kill -9 loops, long: KILLS=500 (file operations) VM_KILLS=100 (VM commands, libvirt) DEAD_ROUNDS=100 (dead daemon, clients) SEED=N (a short run is in make test)
	VMTREE_CRASH_KILLS=$(or $(KILLS),500) VMTREE_CRASH_VM_KILLS=$(or $(VM_KILLS),100) \
	  VMTREE_DEAD_ROUNDS=$(or $(DEAD_ROUNDS),100) \
	  $(if $(SEED),VMTREE_CRASH_SEED=$(SEED)) $(BIN)/python -m pytest -q -s tests/crash

powercut-test: deps deps-guest ## power cut at every flush point, each engine in a guest, side by side: POINTS=all (or N) SEED=N (~2 h under TCG; two points each are in make test)
	VMTREE_POWERCUT_POINTS=$(or $(POINTS),all) $(if $(SEED),VMTREE_CRASH_SEED=$(SEED)) \
	  $(BIN)/python -m tests.crash.powercut_guests

fuzz: deps ## coverage-guided fuzzing of every parser of user and file input (atheris), FUZZ_SECONDS=180 a target, FUZZ_TARGETS=a,b
	FUZZ_SECONDS=$(or $(FUZZ_SECONDS),180) $(if $(FUZZ_TARGETS),FUZZ_TARGETS=$(FUZZ_TARGETS)) \
	  $(BIN)/python -m tests.fuzz.campaign

lint: deps ## ruff check, ruff format --check, mypy
	$(BIN)/ruff check vmtreefs tests
	$(BIN)/ruff format --check vmtreefs tests
	$(BIN)/mypy

debian-guest: ## build a real Debian guest from Debian's packages into build/debian (root.img, domain.xml; cached; as root)
	bash scripts/build-debian-guest.sh $(BUILD)/debian

demo-guest: deps-guest ## build the demo guest (kernel + busybox initramfs) into build/demo
	bash scripts/build-demo-guest.sh $(BUILD)/demo

bench: deps ## benchmarks (tests/bench), side by side with the raw operations; as root
	$(BIN)/python -m tests.bench.clone

bench-backup: deps ## exports vs direct reads, change map vs full compare, clone and ls -l at 10/1,000/10,000 VMs; as root
	$(BIN)/python -m tests.bench.backup

bench-import: deps ## cp --sparse=always of a 2 GiB sparse image: into a new volume, over root.img, and on the XFS directly; as root
	$(BIN)/python -m tests.bench.import_image

bench-lifecycle: deps deps-guest ## disposable from a hot savestate vs cold boot; save time by guest RAM (libvirt, TCG)
	$(BIN)/python -m tests.bench.lifecycle

bench-dmthin: deps deps-guest ## dm-thin clones: vmtreefs vs dmsetup vs ioctl vs lvcreate (in the guest where needed)
	$(BIN)/python -m tests.bench.dmthin_clone

install-mount-helper: ## install mount/mount.fuse.vmtreefs as /sbin/mount.fuse.vmtreefs (mount -t fuse.vmtreefs)
	@if [ ! -x "$(VMTREEFS)" ]; then \
	  echo "install-mount-helper: warning: $(VMTREEFS) is not there yet (make venv, or set VMTREEFS=)" >&2; \
	fi
	@mkdir -p $(BUILD)
	@esc=$$(printf '%s' '$(VMTREEFS)' | sed 's/[&|\\]/\\&/g'); \
	sed "s|^DEFAULT_VMTREEFS=.*|DEFAULT_VMTREEFS='$$esc'|" mount/mount.fuse.vmtreefs \
	  > $(BUILD)/mount.fuse.vmtreefs
	$(SUDO) install -D -m 0755 $(BUILD)/mount.fuse.vmtreefs $(HELPER_DEST)
	@echo "installed $(HELPER_DEST) -> $(VMTREEFS)"

uninstall-mount-helper: ## remove /sbin/mount.fuse.vmtreefs
	$(SUDO) rm -f $(HELPER_DEST)

clean: ## remove the venv, build/ and caches (keeps state/)
	rm -rf $(VENV) $(BUILD) .mypy_cache .ruff_cache .pytest_cache .hypothesis *.egg-info
	find vmtreefs tests -name __pycache__ -type d -prune -exec rm -rf {} + 2>/dev/null || true
