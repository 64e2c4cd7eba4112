"""Stage (a) of the tiny preset's proof: can the recipe learn motion at all?

One shape, one colour, one background, four directions: 256 clips of a red circle on black
travelling half the frame. The training chapter runs on them as a job, with `make tiny-weights`'
learning rate and EMA at the benchmark's best throughput (200 steps of 64 clips); sampled clips
of the four captions, over four seeds, must move the captioned way in at least 90%. The control
below tells whether a failure is the recipe's or the port's.

    .venv/bin/python research/stage_a_one_shape.py   # ~15 CPU minutes -> stage_a_one_shape.json
    .venv/bin/python research/stage_a_one_shape.py --score-control   # after control_pytorch.py

The control (`control_pytorch.py`, Open-Sora v1.1.0's own STDiT2 and IDDPM in PyTorch) trains
on this stage's cached latents and caption features and writes its sampled latents;
`--score-control` decodes them with the same VAE and adds their scores to the record.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from stages import RECIPE, ROOT, pooled, sample_scores, train_job, write_record, write_world

from opensora.data.synthetic import DIRECTIONS, caption_for, random_spec
from opensora.evaluation import Scores, score_clips
from opensora.models.text_encoder import T5Encoder
from opensora.models.vae import VideoAutoencoderKL
from opensora.presets import get_preset
from opensora.runtime import configure
from opensora.train import caption_embeddings, decode_latents

STEPS, BATCH, CLIPS, SEEDS = 200, 64, 256, (0, 1, 2, 3)
OUT = ROOT / "runs" / "research" / "stage_a"


def write_caption_features(captions: list[str]) -> None:
    """The four captions' T5 features, for the PyTorch control's sampler."""
    preset = get_preset("tiny")
    encoder = T5Encoder(preset.t5_path, preset.tokenizer_path,
                        model_max_length=preset.model_max_length)
    y, mask = caption_embeddings(encoder, captions)
    np.savez(OUT / "captions.npz", captions=np.array(captions), y=y, mask=mask)


def score_control() -> dict:
    """Decode and score the control's sampled latents (seeds, captions, C, T, h, w)."""
    data = np.load(OUT / "control_pytorch_latents.npz")
    vae = VideoAutoencoderKL.from_pretrained(get_preset("tiny").vae_path)
    captions = [str(c) for c in data["captions"]]
    scores = [score_clips(decode_latents(vae, latents), captions) for latents in data["latents"]]
    for score in scores:
        print(score.table())
    return Scores([c for s in scores for c in s.clips]).summary()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--score-control", action="store_true")
    args = parser.parse_args()
    configure()
    record_path = ROOT / "research" / "stage_a_one_shape.json"
    if args.score_control:
        record = json.loads(record_path.read_text())
        control = json.loads((ROOT / "research" / "control_pytorch.json").read_text())
        record["control_pytorch"] = {**control, "scores": score_control()}
        write_record(__file__, record)
        return
    rng = np.random.default_rng(0)
    directions = list(DIRECTIONS)
    specs = [random_spec(rng, "red", "circle", directions[i % 4], "black") for i in range(CLIPS)]
    csv_path = write_world(OUT / "world", specs)
    began = time.perf_counter()
    train_job(csv_path, OUT / "train", STEPS, OUT / "weights", batch_size=BATCH)
    train_minutes = (time.perf_counter() - began) / 60
    captions = [caption_for("red", "circle", d, "black") for d in directions]
    write_caption_features(captions)
    scores, _ = sample_scores(captions, SEEDS, OUT / "weights")
    for score in scores:
        print(score.table())
    write_record(__file__, {
        "world": {"clips": CLIPS, "color": "red", "shape": "circle", "background": "black",
                  "directions": directions},
        "recipe": {"steps": STEPS, "batch_size": BATCH, "lr": RECIPE["lr"]},
        "train_minutes_incl_caching": round(train_minutes, 1),
        "seeds": list(SEEDS),
        "scores": pooled(scores),
        "target_motion_accuracy": 0.9,
    })


if __name__ == "__main__":
    main()
