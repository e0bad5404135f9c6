# veil — two commands do everything on a fresh machine:
#   make run    install, sign the demo policy with a local dev key, serve on 127.0.0.1:8080
#   make test   install what the tests need (Redis server included) and run them
# Also: make bench (overhead benchmarks), make lint.

PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
VEIL    := $(VENV)/bin/veil
DEV     := .veil
HOST    ?= 127.0.0.1
PORT    ?= 8080
PLUGIN_DIRS := $(patsubst %/pyproject.toml,%,$(wildcard plugins/*/pyproject.toml))
PROJECTS    := pyproject.toml $(wildcard plugins/*/pyproject.toml)
# reinstall only when a pyproject.toml changed
STAMP_RUN  := $(VENV)/.installed-run
STAMP_TEST := $(VENV)/.installed-test

.PHONY: run test bench lint install install-test system-deps clean help
.DEFAULT_GOAL := help

help:
	@echo "make run    serve the demo gateway on $(HOST):$(PORT) (mock models, no network)"
	@echo "make test   install test dependencies (Redis included) and run every test"
	@echo "make bench  measure gateway overhead against a bare pass-through, and the pii"
	@echo "            stage's added latency against plain Presidio, and the CPU the budget"
	@echo "            and audit stages add to a call, the cache stage's miss and hit paths,"
	@echo "            the routing stage's CPU and the learned router's decision latency"
	@echo "make lint   ruff check, format check, mypy --strict on the core and the plugins"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP_RUN): $(PY) $(PROJECTS)
	$(PY) -m pip install -q -e . $(addprefix -e ,$(PLUGIN_DIRS))
	@touch $@

$(STAMP_TEST): $(STAMP_RUN) $(PROJECTS)
	$(PY) -m pip install -q -e ".[test]" $(foreach d,$(PLUGIN_DIRS),-e "$(d)[test]")
	@touch $@

install: $(STAMP_RUN)
install-test: $(STAMP_TEST) system-deps

# redis-server for the Redis-backed tests, chromium for the audit report's rendering
# test; installed with apt when missing and possible
system-deps:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null; \
	  else echo "note: redis-server not found; Redis tests will be skipped (install redis-server)"; fi; }
	@command -v chromium >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null; \
	  else echo "note: chromium not found; the HTML report test will be skipped (install chromium)"; fi; }

$(DEV)/keys/veil-policy.key: | $(STAMP_RUN)
	$(VEIL) policy keygen --out $(DEV)/keys

# the demo's audit trail key (veil-audit reads it from VEIL_AUDIT_HMAC_KEY)
$(DEV)/keys/audit-hmac.key: | $(STAMP_RUN)
	@mkdir -p $(DEV)/keys
	@(umask 077 && $(PY) -c "import secrets; print(secrets.token_hex(32))" > $@)

run: $(STAMP_RUN) $(DEV)/keys/veil-policy.key $(DEV)/keys/audit-hmac.key
	@$(VEIL) policy sign policies/demo.toml --key $(DEV)/keys/veil-policy.key
	@echo
	@echo "veil is starting on http://$(HOST):$(PORT)  (demo API key: sk-veil-demo)"
	@echo "Try it:"
	@echo "  curl http://$(HOST):$(PORT)/v1/chat/completions \\"
	@echo "    -H 'Authorization: Bearer sk-veil-demo' -H 'Content-Type: application/json' \\"
	@echo "    -d '{\"model\": \"gpt-4o-mini\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}]}'"
	@echo "or point any OpenAI SDK at base_url=http://$(HOST):$(PORT)/v1 with api_key=sk-veil-demo"
	@echo
	@echo "audit trail: $(DEV)/state/audit  (check it: VEIL_AUDIT_HMAC_KEY=\$$(cat $(DEV)/keys/audit-hmac.key) $(VEIL) audit verify $(DEV)/state/audit)"
	@echo
	VEIL_AUDIT_HMAC_KEY=$$(cat $(DEV)/keys/audit-hmac.key) \
	$(VEIL) serve --policy policies/demo.toml --trusted-key $(DEV)/keys/veil-policy.pub \
	  --audience demo --state-dir $(DEV)/state --host $(HOST) --port $(PORT)

test: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest

bench: $(STAMP_TEST)
	@command -v wrk >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] \
	  && (apt-get update -qq && apt-get install -y -qq wrk) >/dev/null || true; }
	$(PY) -m bench $(BENCH_ARGS)
	$(PY) -m bench.pii $(BENCH_PII_ARGS)
	$(PY) -m bench.budget $(BENCH_BUDGET_ARGS)
	$(PY) -m bench.audit $(BENCH_AUDIT_ARGS)
	$(PY) -m bench.cache $(BENCH_CACHE_ARGS)
	$(PY) -m bench.routing $(BENCH_ROUTING_ARGS)
	$(PY) -m bench.routing_learned $(BENCH_ROUTING_LEARNED_ARGS)

lint: $(STAMP_TEST)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) $(DEV) bench/results
