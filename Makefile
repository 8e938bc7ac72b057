# The two commands of the README: `make demo` and `make test`. Everything they need is set up here.
PY     ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Debian packages of the real test peers (IPMI client, SNMP receiver and MIB checker, SSH server,
# fence_ipmilan for the benchmark baseline, OpenIPMI's ipmi_sim as an independent BMC, Chromium
# for the UI tests, a single-node Ceph for the RBD probe and blocklist tests: monitor, OSD, CLI
# and python3-rbd, and a C compiler for the lab's source-address shim of its Ceph clients,
# lab/ceph.py; stunnel4 puts mutual TLS in front of the embedded broker, tests/streams; openssl
# runs compose/kafka/make-pki.sh, tests/compose).
DEBS   := ipmitool openipmi snmptrapd snmp openssh-server smitools fence-agents chromium \
          ceph-mon ceph-osd ceph-common gcc libc6-dev stunnel4 openssl
# strace: the probe's remote script opens each disk before its stat (tests/probes).
DEBS   += strace

.PHONY: demo test venv debs lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

venv: $(STAMP)

debs:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

demo: $(STAMP)
	$(BIN)/fencer demo $(ARGS)

# Every package the worker and the API import is typed (mypy strict; Faust's decorators are
# untyped, see pyproject.toml); the decision core is also fully branch-covered.
TYPED := fencing streams probes notifiers webui

# The suite runs on 4 processes: most end-to-end tests wait on check intervals, not the CPU.
JOBS ?= 4

test: $(STAMP) debs
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict $(TYPED)
	$(BIN)/python -m pytest -n $(JOBS) --dist load --cov=fencing.decision --cov=fencing.gate \
	  --cov-branch --cov-report=term --cov-fail-under=100 $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy --strict $(TYPED)

bench: $(STAMP)
	$(BIN)/python -m benchmarks --json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
