# sdltag developer commands. `make demo` and `make test` are all a newcomer needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-all lint bench bench-zsl model-emoji examples clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first: the CPU build of 2.13.0; otherwise pip resolves a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sdltag tag examples/images --labels examples/extra.txt --no-index

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

lint: $(STAMP)
	$(VENV)/bin/ruff check sdltag tests benchmarks
	$(VENV)/bin/ruff format --check sdltag tests benchmarks

# Benchmarks (measure this machine; results go to benchmarks/results/).
bench: $(STAMP)
	$(PY) benchmarks/bench_labels.py
	$(PY) benchmarks/bench_tag.py
	$(PY) benchmarks/bench_train.py --compile

# The emoji-scenes zero-shot benchmark and the bundled models (benchmarks/README.md).
# EMOJI_DATA: the emoji folder (twitter/, google/, emoji.json); WORK: scratch space.
EMOJI_DATA ?= ../shared/datasets/emoji
WORK ?= work
# Every learned row of benchmarks/RESULTS.md (about 25 minutes per run on 2 cores), the
# image-blind rows, then the table. ZSL_VARIANTS="sdl" ZSL_SEEDS="0" for the committed model only.
ZSL_VARIANTS ?= sdl m1 nosigma
ZSL_SEEDS ?= 0 1 2
bench-zsl: $(STAMP)
	for variant in $(ZSL_VARIANTS); do for seed in $(ZSL_SEEDS); do \
		$(PY) -m benchmarks.recipe_emoji_zsl --data $(EMOJI_DATA) --work $(WORK) --variant $$variant --seed $$seed \
			--out $(WORK)/models/zsl-$$variant-s$$seed || exit 1; \
	done; done
	$(PY) -m benchmarks.zsl_baselines --test $(WORK)/data/zsl-test --unseen benchmarks/unseen_labels.txt \
		--out benchmarks/results/baselines-zsl-test.json
	$(PY) -m benchmarks.zsl_table

model-emoji: $(STAMP)
	$(PY) -m benchmarks.recipe_emoji --data $(EMOJI_DATA) --work $(WORK) --out models/emoji

examples: $(STAMP)
	$(PY) -m benchmarks.make_examples --data $(EMOJI_DATA) --out examples/images

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
