"""Stage (c) of the tiny preset's proof: the committed weights on the held-out captions.

The eight (colour, shape, direction) combinations of `data_samples/heldout_captions.txt` never
occur in training; each is sampled with three seeds at the book's cfg scale and scored from
pixels (`opensora.evaluation`), the statistics `tests/test_tiny_preset.py` asserts.

    .venv/bin/python research/stage_c_heldout.py   # ~2 CPU minutes -> stage_c_heldout.json
"""

from __future__ import annotations

from stages import pooled, sample_scores, write_record

from opensora.presets import DATA_SAMPLES
from opensora.runtime import configure

SEEDS = (0, 1, 2)
TARGETS = {"color_accuracy": 0.9, "motion_accuracy": 0.75, "shape_accuracy": 0.6,
           "coherence": 0.9, "background_error_at_most": 10.0}


def main() -> None:
    configure()
    captions = (DATA_SAMPLES / "heldout_captions.txt").read_text().splitlines()
    scores, _ = sample_scores(captions, SEEDS)
    for score in scores:
        print(score.table())
    write_record(__file__, {"captions": captions, "seeds": list(SEEDS),
                            "scores": pooled(scores), "per_seed": [s.summary() for s in scores],
                            "targets": TARGETS})


if __name__ == "__main__":
    main()
