# pluginpool: the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo test chaos compat browser lint typecheck bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Redis: PLUGINPOOL_REDIS_URL if it answers, else 127.0.0.1:6379, else a redis-server we start.
demo: install
	$(BIN)/pluginpool demo

# --durations: the 15 slowest steps are printed at the end, so time creeping in shows.
# TEST_SESSIONS: the suite is split by file over that many pytest-xdist sessions (most of a
# test's time is spent waiting on workers and Redis); each session takes its own Redis
# database, PLUGINPOOL_TEST_REDIS_DB (9) + its number. TEST_SESSIONS=0 runs it in one.
TEST_SESSIONS ?= 2
test: install browser
	PLUGINPOOL_REDIS_URL=$$($(BIN)/pluginpool ensure-redis) $(BIN)/python -m pytest \
	  --durations=15 $(if $(filter 0,$(TEST_SESSIONS)),,-n $(TEST_SESSIONS) --dist loadfile)

# Only the fault tests (they also run in `make test`): workers, consumers and Redis killed
# or restarted mid-stream, Sentinel, backlogs behind an open breaker, the consuming
# connection made half-open or re-established.
chaos: install
	PLUGINPOOL_CHAOS_SCALE=2 PLUGINPOOL_REDIS_URL=$$($(BIN)/pluginpool ensure-redis) \
	  $(BIN)/python -m pytest -s \
	  tests/pool/test_faults.py tests/tasks/test_reliable_fetch.py \
	  tests/tasks/test_consumer_connection_faults.py tests/pool/test_poison.py

# kombu's own Redis integration tests, from the sdist of the installed kombu (pip, cached in
# .compat/), run unchanged against pluginpool's transport on a redis-server of their own.
# Needs the package index the first time; not part of `make test`. ARGS go to pytest.
compat: install
	$(BIN)/python tests/compat/run.py $(ARGS)

# The dashboard is tested in a real headless Chromium (Debian's package).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian's chromium for the dashboard test"; \
	    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; \
	  else echo "chromium is missing: install Debian's chromium package" >&2; exit 1; fi; }

lint: install typecheck
	$(BIN)/ruff check tasks pool policy tests bench examples

typecheck: install
	mkdir -p .typecheck/pluginpool
	for pkg in tasks pool policy; do ln -sfn ../../$$pkg .typecheck/pluginpool/$$pkg; done
	MYPYPATH=.typecheck $(BIN)/mypy -p pluginpool.tasks -p pluginpool.pool -p pluginpool.policy

bench: install
	PLUGINPOOL_REDIS_URL=$$($(BIN)/pluginpool ensure-redis) $(BIN)/python -m bench.throughput
	$(BIN)/python -m bench.overhead
	$(BIN)/python -m bench.overhead --producers 8 --attribute-jobs 0 --name overhead_8_producers
	$(BIN)/python -m bench.overhead --concurrency 4 --attribute-jobs 0 --name overhead_4_processes
	PLUGINPOOL_REDIS_URL=$$($(BIN)/pluginpool ensure-redis) $(BIN)/python -m bench.breaker
	PLUGINPOOL_REDIS_URL=$$($(BIN)/pluginpool ensure-redis) $(BIN)/python -m bench.sandbox
	PLUGINPOOL_REDIS_URL=$$($(BIN)/pluginpool ensure-redis) $(BIN)/python -m bench.aggregator
	PLUGINPOOL_REDIS_URL=$$($(BIN)/pluginpool ensure-redis) $(BIN)/python -m bench.scaling
	PLUGINPOOL_REDIS_URL=$$($(BIN)/pluginpool ensure-redis) $(BIN)/python -m bench.reliable_fetch
	$(BIN)/python -m bench.many_plugins
	$(BIN)/python -m bench.dead_worker
	$(BIN)/python -m bench.registry_scale
	PLUGINPOOL_REDIS_URL=$$($(BIN)/pluginpool ensure-redis) $(BIN)/python -m bench.fleet
	PLUGINPOOL_REDIS_URL=$$($(BIN)/pluginpool ensure-redis) $(BIN)/python -m bench.environments
	PLUGINPOOL_REDIS_URL=$$($(BIN)/pluginpool ensure-redis) $(BIN)/python -m bench.latency

clean:
	rm -rf $(VENV) .typecheck .run .pytest_cache .mypy_cache .ruff_cache *.egg-info
