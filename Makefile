# The same targets run locally and in .ci/run. Every target that needs Python
# packages depends on the virtualenv stamp, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DURATION ?= 0
# The proxy's hot modules compiled with mypyc (the list: COMPILED in proxy/build.py).
# The editable install compiles them in place when a C compiler works; $(NATIVE)
# recompiles them when their source changed, so no test runs stale compiled code.
NATIVE := $(VENV)/.native
NATIVE_SRC := setup.py proxy/build.py $(shell $(PYTHON) proxy/build.py)
# make test runs these tests against both builds (the asyncpg way), so they cannot
# diverge; a test in tests/proxy/test_build.py checks each run is the build it claims.
BOTH_BUILDS := tests/proxy
COMPILED_RUN := CREDSIDECAR_EXPECT_BUILD=compiled
PURE_RUN := CREDSIDECAR_PURE_PYTHON=1 CREDSIDECAR_EXPECT_BUILD=pure
# Parallel pytest workers (pytest-xdist) for make test: the tests mostly wait on servers'
# clocks, so more workers than cores pay; each worker starts its own servers.
TEST_WORKERS ?= 4

.PHONY: test check lint typecheck unit fast demo bench clean hadolint servers pure-install

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP) $(NATIVE)

$(NATIVE): $(STAMP) $(NATIVE_SRC)
	$(BIN)/python setup.py -q build_ext --inplace --force
	touch $(NATIVE)

lint: $(STAMP)
	$(BIN)/ruff check agent proxy tests benchmarks examples setup.py
	$(BIN)/ruff format --check agent proxy tests benchmarks examples setup.py
	$(BIN)/hadolint --failure-threshold warning Dockerfile

typecheck: $(STAMP)
	$(BIN)/mypy

# The servers the tests start: PostgreSQL (with pgbench), Redis, MariaDB, and kubectl for
# the injector's kustomize check. What is missing comes from Debian when we are root;
# otherwise the list of what to install is printed and the target fails.
SERVER_PACKAGES := \
	postgresql:initdb \
	postgresql-contrib:pgbench \
	redis-server:redis-server \
	mariadb-server:mariadbd \
	mariadb-server:mariadb-install-db \
	kubernetes-client:kubectl

servers:
	@missing=""; \
	for entry in $(SERVER_PACKAGES); do \
		pkg=$${entry%%:*}; cmd=$${entry#*:}; \
		{ command -v $$cmd || ls /usr/lib/postgresql/*/bin/$$cmd; } >/dev/null 2>&1 || \
			case " $$missing " in *" $$pkg "*) ;; *) missing="$$missing $$pkg";; esac; \
	done; \
	[ -z "$$missing" ] && exit 0; \
	if [ "$$(id -u)" != 0 ]; then echo "make test needs:$$missing (apt-get install, as root)"; exit 1; fi; \
	apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -yq --no-install-recommends $$missing

unit: $(NATIVE) servers
	$(COMPILED_RUN) $(BIN)/pytest -q -n $(TEST_WORKERS)
	$(PURE_RUN) $(BIN)/pytest -q -n $(TEST_WORKERS) $(BOTH_BUILDS)

# The tests that need no server (tests/conftest.py marks the others "servers"); the
# protocol's also in pure Python.
fast: $(NATIVE)
	$(COMPILED_RUN) $(BIN)/pytest -q -m "not servers"
	$(PURE_RUN) $(BIN)/pytest -q -m "not servers" $(BOTH_BUILDS)

# make check: the fast tier, under a minute (lint, types, the pure tests).
# make test: everything, against real OpenBao and PostgreSQL.
check: lint typecheck fast

test: lint typecheck unit

demo: $(NATIVE)
	DURATION=$(DURATION) $(BIN)/python examples/demo.py

# PgBouncer (Debian's package) is the proxy's peer in benchmarks/proxy.py, and valgrind
# counts its and the proxy's instructions; only the benchmark needs them, so only this
# target installs them (as root, when missing).
bench: $(NATIVE)
	@missing=""; for cmd in pgbouncer valgrind; do \
		command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$cmd"; done; \
	[ -z "$$missing" ] || [ "$$(id -u)" != 0 ] || \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -yq $$missing; }
	$(BIN)/python benchmarks/agent.py
	$(BIN)/python benchmarks/proxy.py
	$(BIN)/python benchmarks/injector.py

# A machine without a C compiler: `pip install .` with CC=false must still install and
# run, in pure Python (a throwaway venv; the packages come from the same index).
pure-install:
	rm -rf .pure-install
	$(PYTHON) -m venv .pure-install
	CC=false .pure-install/bin/pip install -q .
	.pure-install/bin/credsidecar version | tee .pure-install/version.txt
	grep -q "proxy build: pure Python (not compiled at install" .pure-install/version.txt
	! find .pure-install/lib -name '*.so' -path '*/proxy/*' | grep .
	cd /tmp && $(CURDIR)/.pure-install/bin/python -c "import proxy.server"
	rm -rf .pure-install

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .demo .bench build .pure-install
	find proxy -name '*.so' -delete
