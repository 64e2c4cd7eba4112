# Two commands matter: `make book` and `make test`. Both start from nothing: they create .venv
# and install the pinned dependencies (requirements-lock.txt) plus this package, editable.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYDEVD_DISABLE_FILE_VALIDATION := 1

.PHONY: setup test test-fast eval lint browser book book-clean bench tiny-t5 tiny-vae tiny-weights data clean

setup: $(STAMP)

$(STAMP): requirements-lock.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-lock.txt
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (opensora)" >/dev/null
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check opensora tests notebooks book research

# Everything: unit tests, every notebook as a papermill job, the book build and the browser test.
# Each phase prints its wall time (setup is the .venv stamp above).
test: $(STAMP) lint browser
	$(PY) -m pytest -q --durations=15

# The unit tests alone (no notebook, no book build, no browser, no slow multi-process run):
# the contributor's loop, a few minutes.
test-fast: $(STAMP) lint
	$(PY) -m pytest -q -m "not notebook and not slow and not eval" --durations=10

# The quality of the committed tiny weights (part of `make test`): samples the held-out and the
# training captions with 3 seeds each and prints every clip's colour, shape and motion scores.
eval: $(STAMP)
	$(PY) -m pytest -q -s -m eval tests/test_tiny_preset.py

# The browser test drives Debian's chromium (no browser download); install it when we can.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
	  >/dev/null; } || echo "chromium is not installed: the browser test will be skipped"

# Execute every notebook of _toc.yml (cached: unchanged notebooks are not re-run) and build
# the HTML book into _build/html. Any cell error fails the build.
book: $(STAMP)
	$(VENV)/bin/jupyter-book build . --builder html -W --keep-going

book-clean:
	rm -rf _build

bench: $(STAMP)
	for script in tests/benchmarks/bench_*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

# Regenerate the sample clips and the caption tokenizer (seeded: identical output).
data: $(STAMP)
	$(PY) -m opensora.data.synthetic --out data_samples
	$(PY) -m opensora.data.tokenizer --out data_samples/tokenizer

# The tiny preset's T5: random, seeded weights sized to the caption tokenizer (a frozen stand-in).
tiny-t5: $(STAMP)
	$(PY) -m opensora.models.t5 --make-tiny data_samples/models/t5_tiny \
	  --tokenizer data_samples/tokenizer

# The tiny preset's VAE: trained from scratch on data_samples/ (seeded; about 105 CPU minutes).
tiny-vae: $(STAMP)
	$(PY) -u -m opensora.train.vae --out data_samples/models/vae_tiny

# The tiny preset's STDiT2, a one-off (about 50 CPU minutes on 2 cores; resumable: run it again
# after an interruption and every stage continues where it stopped). A seeded world of
# TINY_CLIPS moving-shape clips, its VAE latents and T5 features cached once, then the training
# chapter as a job, exporting the EMA weights and the loss curve. Batch 16, not the benchmark's
# best clips/s (64, tests/benchmarks/bench_train.py): within the budget the run is short of
# optimizer steps (research/stage_a_one_shape.json). research/ records what the weights learned.
TINY_WORLD = runs/tiny-world
TINY_CLIPS = 2048
TINY_STEPS = 2000

tiny-weights: $(STAMP)
	$(PY) -m opensora.data.synthetic --out $(TINY_WORLD) --num-clips $(TINY_CLIPS) --num-images 0
	$(PY) -m opensora.data.latent_cache --csv $(TINY_WORLD)/video_caption.csv \
	  --vae data_samples/models/vae_tiny --out $(TINY_WORLD)/cache/latents
	$(PY) -m opensora.data.text_cache --csv $(TINY_WORLD)/video_caption.csv \
	  --t5 data_samples/models/t5_tiny --tokenizer data_samples/tokenizer --model-max-length 16 \
	  --out $(TINY_WORLD)/cache/t5
	$(PY) -m opensora.jobs notebooks/06_training.ipynb -o runs/tiny-weights \
	  -p csv_path $(TINY_WORLD)/video_caption.csv -p latent_folder $(TINY_WORLD)/cache/latents \
	  -p text_folder $(TINY_WORLD)/cache/t5 -p max_clips 0 -p steps $(TINY_STEPS) \
	  -p batch_size 16 -p lr 1e-3 -p ckpt_every 50 -p keep_last 2 -p sample_every 0 \
	  -p sample_steps 50 -p export_dir data_samples/models/stdit2_tiny

clean:
	rm -rf _build .pytest_cache .ruff_cache runs
