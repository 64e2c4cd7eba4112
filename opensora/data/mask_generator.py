"""Open-Sora 1.1's training frame masks: which frames of a clip stay clean as conditions.

Each sample draws a mask type with the configured ratios (`mask_ratios` of the training
configs); its frames are then left un-noised, so the model learns the image-to-video,
extension and interpolation tasks that `opensora.mask_strategy` asks of it at inference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

MASK_TYPES = (
    "identity",
    "quarter_random",
    "quarter_head",
    "quarter_tail",
    "quarter_head_tail",
    "image_random",
    "image_head",
    "image_tail",
    "image_head_tail",
    "random",
    "intepolate",  # sic: Open-Sora's spelling, kept so configs carry over
)

# Open-Sora v1.1.0 configs spell the types "mask_no", "mask_quarter_random", ...
LEGACY_MASK_NAMES = {"mask_no": "identity",
                     **{f"mask_{name}": name for name in MASK_TYPES[1:9]}}

# The ratios of Open-Sora 1.1's training configs (75% of samples unmasked).
DEFAULT_MASK_RATIOS: dict[str, float] = {
    "identity": 0.75,
    "quarter_random": 0.025,
    "quarter_head": 0.025,
    "quarter_tail": 0.025,
    "quarter_head_tail": 0.05,
    "image_random": 0.025,
    "image_head": 0.025,
    "image_tail": 0.025,
    "image_head_tail": 0.05,
}


def _canonical_ratios(mask_ratios: Mapping[str, float]) -> dict[str, float]:
    ratios: dict[str, float] = {}
    for name, ratio in mask_ratios.items():
        canonical = LEGACY_MASK_NAMES.get(name, name)
        if canonical not in MASK_TYPES:
            raise ValueError(f"unknown mask type {name!r}; use one of {', '.join(MASK_TYPES)} "
                             f"(or Open-Sora 1.1's {', '.join(LEGACY_MASK_NAMES)})")
        if canonical in ratios:
            raise ValueError(f"mask type {canonical!r} is given twice (as {name!r} too)")
        ratio = float(ratio)
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"mask ratio of {name!r} must be in [0, 1], got {ratio}")
        ratios[canonical] = ratio
    total = sum(ratios.values())
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        hint = (f"; e.g. add 'identity': {1.0 - total:.6g}" if total < 1.0 and
                "identity" not in ratios else "")
        raise ValueError(f"mask ratios must sum to 1, got {total:.6g}{hint}")
    return ratios


class MaskGenerator:
    """Open-Sora 1.1's training frame masks: per sample, a mask type drawn with the given
    ratios, then its frames. Masks are (T,) / (B, T) bool, True = frame is noised and learnt,
    False = frame stays clean as a condition.

    Types: identity (no condition); image_head / image_tail / image_head_tail / image_random
    (one frame at the start, end, both ends, anywhere); quarter_* (the same with a run of 1 to
    T//4 frames); intepolate (every other frame, from 0 or 1); random (each frame a condition
    with a probability drawn in [0.1, 0.9]). A mask never conditions every frame; T <= 1 is
    never masked. Unlike the reference (which fails there) quarter runs for T < 4 have length 1.
    """

    def __init__(self, mask_ratios: Mapping[str, float] | None = None,
                 seed: np.random.Generator | int | None = None) -> None:
        self.mask_ratios = _canonical_ratios(DEFAULT_MASK_RATIOS if mask_ratios is None
                                             else mask_ratios)
        self._names = list(self.mask_ratios)
        self._cumulative = np.cumsum([self.mask_ratios[n] for n in self._names])
        self.rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)

    def draw_type(self) -> str:
        """A mask type, with probability equal to its ratio."""
        index = int(np.searchsorted(self._cumulative, self.rng.random(), side="right"))
        return self._names[index] if index < len(self._names) else "identity"

    def make_mask(self, mask_type: str, num_frames: int) -> np.ndarray:
        """The (T,) mask of one type, its random sizes and positions drawn from the generator."""
        mask_type = LEGACY_MASK_NAMES.get(mask_type, mask_type)
        if mask_type not in MASK_TYPES:
            raise ValueError(f"unknown mask type {mask_type!r}; use one of {MASK_TYPES}")
        mask = np.ones(num_frames, dtype=bool)
        if num_frames <= 1 or mask_type == "identity":
            return mask
        rng = self.rng
        family, _, where = mask_type.partition("_")
        if family in ("quarter", "image"):
            size = 1 if family == "image" else int(rng.integers(1, max(1, num_frames // 4) + 1))
            if where == "random":
                start = int(rng.integers(0, num_frames - size + 1))
                mask[start:start + size] = False
            if where in ("head", "head_tail"):
                mask[:size] = False
            if where in ("tail", "head_tail"):
                mask[-size:] = False
        elif mask_type == "intepolate":
            mask[int(rng.integers(0, 2))::2] = False
        elif mask_type == "random":
            condition_probability = rng.uniform(0.1, 0.9)
            mask = rng.random(num_frames) > condition_probability
        if not mask.any():
            mask[-1] = True
        return mask

    def get_mask(self, num_frames: int) -> np.ndarray:
        return self.make_mask(self.draw_type(), num_frames)

    def get_masks(self, batch_size: int, num_frames: int) -> np.ndarray:
        """(B, T) bool, one independently drawn mask per sample."""
        if batch_size < 1 or num_frames < 1:
            raise ValueError(f"batch_size ({batch_size}) and num_frames ({num_frames}) must be "
                             f"positive")
        return np.stack([self.get_mask(num_frames) for _ in range(batch_size)])
