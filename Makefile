# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The PyTorch build for a fresh venv; a machine with its own (GPU) build sets TORCH_SPEC= to keep it.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test lint bench bench-timing scale export-sizes latency frontier serving hostile-table clean

setup: $(VENV)/.installed $(FMNIST)

$(FMNIST):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[pipeline,test]"
	touch $@

demo: setup
	PREFECT_HOME=$(CURDIR)/.prefect PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_LOGGING_EXTRA_LOGGERS=starfish \
		$(PY) -m flows.compress

# Two workers, each test module whole on one (module fixtures share servers and runs): most tests
# wait on servers and subprocesses, so the suite takes about a fifth less time on two cores. Each
# worker takes the next module in tests/conftest.py's order (the slow ones first), not xdist's.
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

# pycodestyle, pyflakes and import order, as configured in pyproject.toml.
lint: setup
	$(VENV)/bin/ruff check .

# The committed benchmarks. Each grid saves its cells as they finish and resumes where it stopped;
# run `make bench` in a second shell to use a second core (the two share every grid).
CNN := --set model.name=starfish_cnn_fmnist --set model.checkpoint=data/demo/starfish_cnn_fmnist.safetensors
bench: setup
	$(VENV)/bin/starfish bench --out results/bench
	$(VENV)/bin/starfish bench --out results/seeds --pruners magnitude wanda --sparsities 0.75 0.9 0.95 --seeds 0 1 2
	$(VENV)/bin/starfish bench --out results/fast --pruners magnitude wanda --sparsities 0.75 0.9 0.95 --seeds 0 1 2 \
		--healers fast
	$(VENV)/bin/starfish bench --out results/fast_lr --pruners magnitude wanda --sparsities 0.75 0.9 0.95 \
		--healers fast fast-lr0.0006 fast-lr0.001 fast-lr0.004
	$(VENV)/bin/starfish bench --out results/steps --pruners magnitude --sparsities 0.9 0.95 \
		--healers starfish recommended fast --steps 100 200 400 800 1570
	$(VENV)/bin/starfish bench --out results/calibration_size --pruners magnitude --sparsities 0.75 0.9 \
		--fractions 0.001 0.004 0.01 0.02 --healers layerwise logit-kd starfish
	$(VENV)/bin/starfish bench --out results/holdout --pruners magnitude --sparsities 0.75 0.9 0.95 \
		--healers starfish starfish-holdout0 starfish-holdout0.2
	$(VENV)/bin/starfish bench --out results/bench_cnn $(CNN) --pruners magnitude wanda --sparsities 0.5 0.75 0.9 \
		--healers none logit-kd faithful starfish recommended
	$(VENV)/bin/starfish bench --out results/batchnorm $(CNN) --pruners magnitude wanda --sparsities 0.75 0.9 \
		--seeds 0 1 2 --healers starfish-bn-train starfish-bn-frozen starfish-bn-recalibrate
	$(VENV)/bin/starfish bench --out results/bench_structured/vit --structures neurons+heads \
		--pruners magnitude contribution --sparsities 0.25 0.5 0.75 --healers none layerwise logit-kd starfish recommended
	$(VENV)/bin/starfish bench --out results/bench_structured/vit_seeds --structures neurons+heads \
		--pruners magnitude wanda contribution --sparsities 0.5 --seeds 0 1 2 \
		--healers none layerwise logit-kd starfish recommended starfish-holdout0
	$(VENV)/bin/starfish bench --out results/bench_structured/vit_variants --structures neurons+heads \
		--pruners magnitude --sparsities 0.5 --seeds 0 1 2 \
		--healers starfish starfish-logit starfish-lr1e-3 starfish-lr3e-4 starfish-nmse starfish-lr2e-3 recommended-lr2e-3
	$(VENV)/bin/starfish bench --out results/bench_structured/vit_global --structures neurons+heads \
		--pruners magnitude wanda --sparsities 0.5 --seeds 0 1 2 --healers none starfish --set prune.global_ranking=true
	$(VENV)/bin/starfish bench --out results/bench_structured/vit_torch_pruning --structures neurons+heads \
		--pruners torch-pruning --sparsities 0.25 0.5 0.75 --healers none logit-kd
	$(VENV)/bin/starfish bench --out results/bench_structured/cnn $(CNN) --structures channels \
		--pruners magnitude contribution --sparsities 0.25 0.5 0.75 \
		--healers none logit-kd starfish recommended starfish-last-state
	$(VENV)/bin/starfish bench --out results/bench_structured/vit_stages --structures neurons+heads \
		--pruners contribution --sparsities 0.5 0.75 --healers starfish recommended --stages 3
	$(VENV)/bin/starfish bench --out results/bench_structured/vit_block_loss --structures neurons+heads \
		--pruners contribution --sparsities 0.75 --healers recommended \
		--set prune.structure=neurons+heads --set prune.allocation=block-loss
	for variant in "uniform" "stages3 --stages 3" "depth1 --set prune.depth=1" "depth2 --set prune.depth=2"; do \
		set -- $$variant; out=$$1; shift; \
		$(VENV)/bin/starfish bench --out results/bench_structured/vit_depth/$$out --structures neurons+heads \
			--pruners contribution --sparsities 0.75 --seeds 0 1 2 --healers recommended \
			--set prune.structure=neurons+heads "$$@" || exit 1; \
	done
	@echo "heal-time ratios: run 'make bench-timing' alone on a quiet machine"

# Heal time over plain training steps needs a quiet machine: one process, every core. The second
# grid times the cells of results/bench_structured/vit that the structured ratios are read from.
bench-timing: setup
	$(VENV)/bin/starfish bench --out results/timing --pruners magnitude --sparsities 0.9 --structures unstructured \
		--healers logit-kd starfish recommended fast
	$(VENV)/bin/starfish bench --out results/timing/structured --structures neurons+heads \
		--pruners magnitude contribution --sparsities 0.25 0.5 0.75 --healers starfish recommended

# Time and memory of each stage on a DeiT and a generated ImageNet-layout JPEG tree (resumable).
scale: setup
	$(VENV)/bin/starfish scale --out results/scale

# Every hostile file of tests/hostile.py through every reading command: exit codes, time, memory.
hostile-table: setup
	$(PY) -m tests.hostile results/hostile

export-sizes: setup
	$(VENV)/bin/starfish export-sizes --out results/export

latency: setup
	$(VENV)/bin/starfish latency --out results/latency

# Recovery (demo models, served in onnxruntime) against speed-up (deit_small, resnet50) for
# structure x int8 x heal; resumable, and a second `make frontier` shares the grid.
frontier: setup
	$(VENV)/bin/starfish frontier --out results/frontier

# starfish serve under 4 concurrent clients on loopback, float and int8, at the shipped deadline
# and at a tight one (results/serving; about 4 minutes).
serving: setup
	$(VENV)/bin/starfish serve-bench --out results/serving --seconds 20

clean:
	rm -rf out mlruns mlartifacts mlflow.db .prefect
