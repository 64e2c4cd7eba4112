"""Does the tiny T5 keep captions apart that differ in one word, direction as well as colour?

The tiny preset's T5 is random and frozen: a stand-in for T5-XXL. Random transformer layers may
blur one changed word into its neighbours, and a caption embedder cannot recover what the text
encoder did not keep. For every pair of world captions that differ only in colour, only in
shape, only in direction or only in background, this measures the relative distance of their
embeddings, ||e1 - e2|| / ||e1|| over the valid tokens, and the same at the changed word alone.

    .venv/bin/python research/caption_separation.py   # -> research/caption_separation.json
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np

from opensora.data.synthetic import BACKGROUNDS, COLORS, DIRECTIONS, SHAPES, caption_for
from opensora.models.text_encoder import T5Encoder
from opensora.presets import get_preset
from opensora.runtime import configure

ATTRIBUTES = {"color": list(COLORS), "shape": list(SHAPES), "direction": list(DIRECTIONS),
              "background": list(BACKGROUNDS)}


def embeddings(encoder: T5Encoder, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    out = encoder.encode(captions)
    return out["y"].asnumpy()[:, 0], out["mask"].asnumpy().astype(bool)


def separation(encoder: T5Encoder) -> dict[str, dict[str, float]]:
    combos = list(itertools.product(COLORS, SHAPES, DIRECTIONS, BACKGROUNDS))
    index = {c: i for i, c in enumerate(combos)}
    y, mask = embeddings(encoder, [caption_for(*c) for c in combos])
    word_position = {"color": 1, "shape": 2, "direction": 4, "background": 7}
    result = {}
    for slot, (name, values) in enumerate(ATTRIBUTES.items()):
        whole, word = [], []
        for combo in combos:
            for other in values:
                if other <= combo[slot]:
                    continue
                pair = index[combo], index[(*combo[:slot], other, *combo[slot + 1:])]
                valid = mask[pair[0]]
                a, b = y[pair[0]][valid], y[pair[1]][valid]
                whole.append(np.linalg.norm(a - b) / np.linalg.norm(a))
                p = word_position[name]
                word.append(np.linalg.norm(a[p] - b[p]) / np.linalg.norm(a[p]))
        result[name] = {"pairs": len(whole), "relative_distance": float(np.mean(whole)),
                        "at_changed_word": float(np.mean(word))}
    return result


def main() -> None:
    configure()
    preset = get_preset("tiny")
    encoder = T5Encoder(preset.t5_path, preset.tokenizer_path,
                        model_max_length=preset.model_max_length)
    record = {"t5": str(preset.t5_path.relative_to(preset.t5_path.parents[2])),
              "separation": separation(encoder)}
    out = Path(__file__).with_suffix(".json")
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
