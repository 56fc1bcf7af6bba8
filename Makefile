# Two commands: `make serve` and `make test`. Both set everything up on a fresh machine.
VENV   := .venv
PY     := $(VENV)/bin/python
KILN   := $(VENV)/bin/kiln
STAMP  := $(VENV)/.kiln-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup serve test migrate bench clean chromium tesseract screenshots cluster

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned to the CPU wheel on disk; anything looser pulls GBs of CUDA.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

migrate: setup
	$(KILN) db upgrade

serve: migrate
	$(KILN) serve --host 127.0.0.1 --port 8000

# A whole cluster on this machine (Ray head, active + standby scheduler, API replicas on 8000 and 8010,
# PostgreSQL and Redis on 127.0.0.1); docs/CLUSTER.md. Ctrl-C stops all of it. Options: CLUSTER_ARGS="--api-port 9000 …".
cluster: migrate
	$(KILN) cluster $(CLUSTER_ARGS)

# The web UI's tests drive Debian's Chromium through Playwright (never `playwright install`).
chromium:
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

# The embedded model's scorecard reads its words back with Debian's Tesseract (offline, weights packaged).
tesseract:
	command -v tesseract >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tesseract-ocr)

test: setup chromium tesseract
	$(PY) -m pytest -q

# The README's pictures of the web UI (docs/chat-desktop.png, chat-phone.png, admin.png, chat-followup-*.png).
screenshots: setup chromium
	KILN_UPDATE_SCREENSHOTS=1 $(PY) -m pytest -q tests/web/test_screenshots.py tests/web/test_chat_followups.py

bench: setup
	command -v wrk >/dev/null || apt-get install -y -q wrk
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) var build dist
