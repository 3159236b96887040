# vmm-task — entry points. See README.md.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# Builds that are slow and deterministic (kernel, Nuitka) are cached here, outside the work tree,
# keyed by the hash of their inputs.
export VMM_TASK_CACHE ?= $(HOME)/.cache/vmm-task
# Container runtime installed in the guest: crun (default) or runc.
RUNTIME ?= crun
# DEBUG=1 adds a static busybox to the guest for a debug shell.
DEBUG ?= 0
# Passed as arguments, not exported: a DEBUG in the environment turns on the debug output of
# tools the tests run (crictl's SPDY streams print their frames into exec output).
# tests/e2e drives the real containerd 2.4, runc and crictl: upstream binaries that CI and every
# developer have beside the project (../shared/containerd/bin). Without them the e2e layer skips,
# naming what is missing.
export VMM_TASK_CONTAINERD_BIN ?= $(wildcard $(abspath ../shared/containerd/bin))

.PHONY: setup protos guest-image guest-image-runc guest-image-debug floor-image test test-unit test-agent test-vm test-e2e \
        critest demo bench stress reproducible-check debian13-check clean

setup:
	@bash scripts/setup.sh
	@$(MAKE) --no-print-directory protos

# Python code generated from proto/ into vmm_common/protos/ (not committed).
protos:
	@$(PY) scripts/genproto.py

guest-image: setup
	@$(PY) -m initrd.guest_image --runtime $(RUNTIME) --debug $(DEBUG)

# The same kernel and agent (cached, not rebuilt) with runc in place of crun, in build/guest-runc:
# the VM tests run a pod's whole lifecycle on it too.
guest-image-runc: setup
	@$(PY) -m initrd.guest_image --runtime runc --out build/guest-runc

# The same with a static busybox (DEBUG=1) in build/guest-debug: what tests run by ExecVMProcess.
guest-image-debug: setup
	@$(PY) -m initrd.guest_image --runtime $(RUNTIME) --debug 1 --out build/guest-debug

# The boot benchmark's floors: same kernel, /init a static busybox (initrd) or a Nuitka-compiled
# Python program (pmem root) printing the ready line at once.
floor-image: setup
	@$(PY) -m initrd.floor

# The agent layer runs a second time with runc: the guest's other runtime (RUNTIME=runc).
test: setup guest-image guest-image-runc guest-image-debug
	$(PY) -m pytest -q -ra tests
	VMM_TASK_TEST_RUNTIME=runc $(PY) -m pytest -q -ra tests/agent

test-unit: setup
	$(PY) -m pytest -q -ra tests/unit

test-agent: setup
	$(PY) -m pytest -q -ra tests/agent
	VMM_TASK_TEST_RUNTIME=runc $(PY) -m pytest -q -ra tests/agent

test-vm: setup guest-image guest-image-runc guest-image-debug
	$(PY) -m pytest -q -ra tests/vm

# containerd 2.4 + crictl with both runtimes, runc (the baseline) and vmm: docs/e2e.md.
test-e2e: setup guest-image
	$(PY) -m pytest -q -ra tests/e2e

# critest (CRI validation) on the same node, runc then vmm: build/critest/report.md.
# CRITEST_ARGS=--check (CI) fails when a spec passing on runc does not on vmm (docs/critest.md).
critest: setup guest-image
	$(PY) tests/e2e/critest_run.py $(CRITEST_ARGS)

demo: setup guest-image
	@$(PY) scripts/demo.py

bench: setup guest-image
	@$(PY) -m bench.run

# The reliability soak at full length (make test runs it short): docs/benchmarks.md; then the
# guest image rebuilt from an empty cache must equal the cached one byte for byte.
stress: setup guest-image
	SOAK_CYCLES=200 SOAK_CONTAINER_CYCLES=200 $(PY) -m pytest -q -ra -s tests/vm/test_soak.py
	@$(PY) -m initrd.reproducible

# Kernel, agent and runtime packages rebuilt with an empty cache (Nuitka's cache and ccache off
# too) into build/guest-reproduced, compared with build/guest: ~15 min on 2 cores, not in make test.
reproducible-check: setup guest-image
	@$(PY) -m initrd.reproducible

# By hand, not in CI: `make setup` in a fresh Debian 13 root (debootstrap + chroot, root only).
debian13-check: setup
	@bash scripts/debian13-check.sh

clean:
	rm -rf build vmm_common/protos/*/ vmm_common/protos/.stamp
