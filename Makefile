# Two commands do all set-up: `make repro` (main job on the embedded default) and `make test`.
# Re-running either skips what is already installed (stamp files in .venv/).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch and torchvision must be installed as a matching pair (PyPI's torchvision does not import
# beside other torch builds); torchsort is compiled against the torch installed here.
TORCH_PAIR := torch==2.14.1 torchvision==0.29.1
TORCHSORT := torchsort==0.1.10
# Every install takes the exact versions of constraints.txt (`make lock` refreshes it), so a fresh clone
# reproduces the committed dvc.lock outputs on this machine kind.
CONSTRAINTS := -c constraints.txt

.PHONY: setup lock lint browser vega postgres repro test test-fast bench dashboard exps plots schema clean gpu-wheels gpu-check

setup: $(VENV)/.project-installed

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip wheel setuptools

$(VENV)/.torch-installed: | $(BIN)/python
	$(BIN)/pip install $(CONSTRAINTS) $(TORCH_PAIR)
	touch $@

# torchsort builds a CUDA extension whenever `nvcc` is on PATH (without it, a CPU-only one: set-up then
# fails where torch sees a GPU, see src/core/devices.py); without a CUDA device (or where
# libcudart cannot be linked) that build fails, so nvcc is hidden and the CPU-only extension built.
# TORCHSORT_CUDA=1 insists on the CUDA extension (an image or a login node with nvcc but no GPU:
# the GPU architectures to compile for then come from TORCH_CUDA_ARCH_LIST).
TORCHSORT_CUDA ?= auto
TORCH_CUDA_ARCH_LIST ?= 8.0;8.6;8.9;9.0+PTX
$(VENV)/.torchsort-installed: $(VENV)/.torch-installed constraints.txt
	@if [ "$(TORCHSORT_CUDA)" = 1 ]; then \
	  TORCH_CUDA_ARCH_LIST="$(TORCH_CUDA_ARCH_LIST)" $(BIN)/pip install $(CONSTRAINTS) --no-build-isolation $(TORCHSORT); \
	elif [ "$(TORCHSORT_CUDA)" = auto ] \
	   && $(BIN)/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
	   && $(BIN)/pip install $(CONSTRAINTS) --no-build-isolation $(TORCHSORT); then :; \
	else \
	  echo "torchsort: building the CPU-only extension"; \
	  PATH="$$(echo "$$PATH" | tr ':' '\n' | while read -r d; do [ -x "$$d/nvcc" ] || printf '%s:' "$$d"; done)" \
	    $(BIN)/pip install $(CONSTRAINTS) --no-build-isolation $(TORCHSORT); \
	fi
	$(BIN)/python -c "import torchsort"
	$(BIN)/python -m src.core.devices  # where torch sees a GPU: soft_rank must run on it, else set-up fails
	touch $@

$(VENV)/.project-installed: pyproject.toml constraints.txt $(VENV)/.torchsort-installed
	$(BIN)/pip install $(CONSTRAINTS) -e '.[dev]'
	touch $@

# Refresh constraints.txt: a clean venv gets the newest versions pyproject.toml's ranges allow (torch pair
# and torchsort as set-up installs them), and their freeze becomes the new pin. Then `make repro` and
# commit constraints.txt, dvc.lock and the metrics together.
LOCK_VENV := .venv-lock
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet --upgrade pip wheel setuptools
	$(LOCK_VENV)/bin/pip install --quiet $(TORCH_PAIR)
	PATH="$$(echo "$$PATH" | tr ':' '\n' | while read -r d; do [ -x "$$d/nvcc" ] || printf '%s:' "$$d"; done)" \
	  $(LOCK_VENV)/bin/pip install --quiet --no-build-isolation $(TORCHSORT)
	$(LOCK_VENV)/bin/pip install --quiet -e '.[dev]'
	{ sed -n '1,3p' constraints.txt; $(LOCK_VENV)/bin/pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt && rm -rf $(LOCK_VENV)
	@echo "constraints.txt refreshed: run make repro and commit it with dvc.lock"

# GPU check (README "GPU check"). `make gpu-wheels` here (pip reaches an index) keeps in .whl/ what a
# CUDA machine with only PyTorch lacks, at this venv's versions, for its Python; `make gpu-check` there
# installs them offline, builds torchsort with its nvcc and runs `python -m src.bench.gpu_check`.
GPU_WHEELS := .whl
GPU_PYTHON ?= 3.12
GPU_PACKAGES := optuna sqlalchemy alembic colorlog mako spams-bin
GPU_PLATFORMS := $(foreach n,17 24 27 28,--platform manylinux_2_$(n)_x86_64) --platform manylinux2014_x86_64
gpu-wheels: setup
	mkdir -p $(GPU_WHEELS)
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) --implementation cp \
	  $(GPU_PLATFORMS) -d $(GPU_WHEELS) $$($(BIN)/python -c "from importlib.metadata import version; \
	  print(' '.join(f'{n}=={version(n)}' for n in '$(GPU_PACKAGES)'.split()))")
	$(BIN)/pip download -q --no-deps --no-binary=:all: --no-build-isolation -d $(GPU_WHEELS) $(TORCHSORT)
	@du -sh $(GPU_WHEELS)

gpu-check:
	bash deploy/gpu_check.sh

# Stage commands call `python`: the venv's bin goes first on PATH so they run in the venv.
repro: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# The dashboard's browser check needs Chromium (Debian package); installed where apt-get can run.
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium for the dashboard browser test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; \
	else echo "chromium not found and not installable here: the browser test will be skipped"; fi

# `dvc plots show` writes a page that loads vega from a CDN. For offline viewing (and the browser test)
# set-up keeps the versions that page names, from the npm registry, and an HTML template using them.
VEGA_DIR := $(VENV)/share/vega
VEGA_PACKAGES := vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2
vega: $(VEGA_DIR)/offline.html

$(VEGA_DIR)/offline.html: | $(BIN)/python
	@if ! command -v npm >/dev/null 2>&1; then \
	  echo "npm not found: offline plot pages (and their browser test) are not available"; exit 0; fi; \
	mkdir -p $(VEGA_DIR) && cd $(VEGA_DIR) && npm pack --silent $(VEGA_PACKAGES) >/dev/null \
	  && for p in vega vega-lite vega-embed; do tar xzf $$p-[0-9]*.tgz -O package/build/$$p.min.js > $$p.min.js; done \
	  && rm -f ./*.tgz \
	  && printf '<!DOCTYPE html>\n<html>\n<head>\n<meta charset="utf-8">\n<title>DVC Plot</title>\n%s\n</head>\n<body>\n{plot_divs}\n</body>\n</html>\n' \
	     "$$(for p in vega vega-lite vega-embed; do printf '<script src="file://%s/%s.min.js"></script>' "$$PWD" $$p; done)" \
	     > offline.html

# The scale-out tests start a throwaway PostgreSQL server (initdb/pg_ctl; Debian package postgresql).
postgres:
	@if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing the PostgreSQL server for the scale-out tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql; \
	else echo "PostgreSQL server not found and not installable here: its tests will be skipped (fail under CI)"; fi

# Static checks first (seconds): import order and undefined names (ruff), the import contracts of
# pyproject.toml (core <- data <- model <- engine <- report <- search <- entry points; import-linter).
lint: setup
	$(BIN)/ruff check src tests
	$(BIN)/lint-imports --no-cache

# Both share the set-up: under CI=true a test whose tool is missing fails instead of skipping.
TEST_SETUP := lint browser vega postgres
test: $(TEST_SETUP)
	$(BIN)/python -m pytest --durations=15

test-fast: $(TEST_SETUP)
	$(BIN)/python -m pytest -m "not slow" --durations=10

bench: setup
	$(BIN)/python -m src.bench data
	$(BIN)/python -m src.bench stain
	$(BIN)/python -m src.bench trial --set model.unfrozen_blocks=1

# Experiments side by side: metrics, the tuned recipe and the params that differ; not the search space,
# dependency hashes, code files, the CV figures evaluate repeats from tune.json or the selection's upward-biased
# ones (`dvc exp show` for everything). DVC names a column by its key alone where no other file has it.
DVC = $(if $(wildcard $(BIN)/dvc),$(BIN)/dvc,dvc)
EXPS_DROP := ^(src/[^:]*|data/[^:]*|metrics/[^:]*|models/[^:]*|tune\.space\..*|Created|State|Executor|trial|studies/best_params\.yaml:(study|cv_spearman|trial)|metrics/evaluate\.json:cv_.*|metrics/tune\.json:(floor_spearman|map_floor_spearman)|(metrics/tune\.json:)?(nested_.*|biased_upward\..*|n_failed|best_trial|smoothing_sigma))$$
exps:
	@COLUMNS=$${COLUMNS:-300} $(DVC) exp show --no-pager --only-changed --drop '$(EXPS_DROP)' $(ARGS)

# The plots of the workspace (`make plots REVS="exp-a exp-b"` compares experiments), viewable offline.
plots: vega
	$(DVC) plots $(if $(REVS),diff $(REVS),show) --html-template $(VEGA_DIR)/offline.html

# Review studies (trials, params, artifacts) at http://127.0.0.1:8080 (tune.storage; one line if none exists yet)
dashboard: setup
	$(BIN)/python -m src.dashboard --host 127.0.0.1 --port 8080

# The JSON Schema of params.yaml, from its sections (src/core/sections.py); a test keeps it current.
schema: setup
	$(BIN)/python -m src.core.config > params.schema.json

clean:
	rm -rf data/simulated.h5 data/simulated_truth.h5 data/normalized data/patches models outputs .pytest_cache
