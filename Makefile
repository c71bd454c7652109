# Everything a fresh machine needs: `make run` (the main job) and `make test` (the test suite) create the
# virtual environment in .venv from requirements.lock on first use and reuse it afterwards.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: setup run test lint clean

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --no-deps -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

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
