# Two commands on a fresh machine: `make run` and `make test` (see README).
SHELL := /bin/bash
VENV := .venv
STAMP := $(VENV)/.installed
PYTHON ?= python3

# No telemetry from any tool; `python` in dvc.yaml commands is the venv's.
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
# Idle OpenMP threads sleep instead of spinning: on 2 shared cores spinning made training 10x slower.
export OMP_WAIT_POLICY ?= PASSIVE
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install run test check hooks ui serve bench pretrain clean-venv lock

# Reinstall only when pyproject.toml or the lock is newer than the stamp. Every package is
# installed at the version requirements.lock pins (pip constraints); `make lock` refreshes it.
LOCK := requirements.lock
$(STAMP): pyproject.toml $(LOCK)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -c $(LOCK) -e ".[pipeline,dev]"
	touch $(STAMP)

# Only the library and `idm upscale` (torch, numpy, Pillow, OpenCV, tqdm, PyYAML): no pipeline.
install:
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -c $(LOCK) -e .
	@echo "ready: $(VENV)/bin/idm upscale photo.jpg -s 4   (make run installs the pipeline too)"

# Resolve pyproject.toml afresh (newest allowed releases) in a scratch venv and pin the result.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --upgrade pip
	.lock-venv/bin/python -m pip install --quiet -e ".[pipeline,dev]"
	{ echo "# pip constraints for make's venv: every package pinned. Refresh: make lock (Python $$(.lock-venv/bin/python -c 'import platform; print(platform.python_version())'))"; \
	  .lock-venv/bin/python -m pip freeze --exclude-editable; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf .lock-venv

# The project's params check runs first: DVC reads params.yaml too, and would expand a hostile one.
run: $(STAMP)
	$(VENV)/bin/python -m pipeline.params
	dvc repro

# One test file per worker process (module fixtures run once); one thread each (tests/conftest.py).
TEST_WORKERS ?= 2
test: $(STAMP)
	$(VENV)/bin/python -m pipeline.params
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadfile

# The params check alone (what `make run` does before `dvc repro`): run it before a plain `dvc repro`.
check: $(STAMP)
	$(VENV)/bin/python -m pipeline.params

# Install scripts/pre-commit as this clone's git pre-commit hook: a commit whose params.yaml fails the check is refused.
hooks:
	@hook="$$(git rev-parse --git-path hooks)/pre-commit"; \
	if [ -e "$$hook" ] && ! cmp -s scripts/pre-commit "$$hook"; then \
		echo "error: $$hook exists; remove it, or call scripts/pre-commit from it" >&2; exit 1; fi; \
	mkdir -p "$$(dirname "$$hook")" && install -m 755 scripts/pre-commit "$$hook" && echo "installed $$hook"

ui: $(STAMP)
	mlflow ui --host 127.0.0.1 --port 5000 \
		--backend-store-uri "$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db}" \
		--default-artifact-root "$(CURDIR)/mlartifacts"

# Prefect server + MLflow UI on 127.0.0.1, scheduled retrain/evaluate flows; Ctrl-C stops all.
serve: $(STAMP)
	$(VENV)/bin/python -m pipeline.servers

# The shipped pretrained model (recipes/pretrain.yaml; MODEL_CARD.md): not part of `make run`.
# Resumes where it stopped; PRETRAIN_PROCS DDP processes of one thread each (bench/README.md).
PRETRAIN := recipes/pretrain.yaml
PRETRAIN_PROCS ?= 2
pretrain: $(STAMP)
	$(VENV)/bin/python -m pipeline.params $(PRETRAIN)
	$(VENV)/bin/python -m pipeline.stages.prepare --params $(PRETRAIN) --out data/pretrain/prepared
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc-per-node $(PRETRAIN_PROCS) -m pipeline.stages.train \
		--params $(PRETRAIN) --prepared data/pretrain/prepared --out models/pretrained --alias pretrained
	$(VENV)/bin/python -m pipeline.stages.evaluate --params $(PRETRAIN) --prepared data/pretrain/prepared \
		--checkpoint models/pretrained/model.pt --sr-out data/pretrain/sr --metrics reports/pretrained/metrics.json \
		--headline reports/pretrained/headline \
		--scales reports/pretrained/scales.csv --per-image reports/pretrained/per_image.csv
	$(VENV)/bin/python -m pipeline.stages.export_pretrained models/pretrained/model.pt

bench: $(STAMP)
	$(VENV)/bin/python -m bench.resize

clean-venv:
	rm -rf $(VENV)
