"""Named configurations: which VAE, text encoder and diffusion transformer a run uses.

`tiny` is the default everywhere: every component is small enough to train from scratch on the
bundled `data_samples/` on a CPU, so the book runs end to end on a laptop. The XL presets carry
the published Open-Sora shapes; their weights are not bundled and are passed as paths.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_SAMPLES = REPO_ROOT / "data_samples"


@dataclass(frozen=True)
class Preset:
    """Everything a pipeline needs to build its three models and shape its inputs."""

    name: str
    model_type: str  # "STDiT2" (Open-Sora 1.1) or "STDiT" (1.0)
    model: dict[str, Any]  # constructor keywords of the diffusion transformer
    vae_path: Path | None  # diffusers-layout AutoencoderKL folder
    t5_path: Path | None  # HF T5 folder (config + weights)
    tokenizer_path: Path | None  # folder loadable by transformers.AutoTokenizer
    model_path: Path | None  # trained transformer weights (folder or file)
    num_frames: int
    image_size: tuple[int, int]
    fps: int = 8
    frame_interval: int = 1
    model_max_length: int = 16
    vae_micro_batch_size: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def with_paths(self, **paths: str | Path | None) -> Preset:
        """Override asset paths (e.g. published weights) keeping the shapes."""
        return replace(self, **{k: (Path(v) if v else None) for k, v in paths.items()})


_TINY_MODELS = DATA_SAMPLES / "models"

PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        model_type="STDiT2",
        model=dict(
            input_size=(None, None, None),
            input_sq_size=16,
            in_channels=4,
            patch_size=(1, 2, 2),
            hidden_size=128,
            depth=4,
            num_heads=4,
            mlp_ratio=4.0,
            class_dropout_prob=0.1,
            pred_sigma=True,
            caption_channels=64,
            model_max_length=16,
            qk_norm=True,
        ),
        vae_path=_TINY_MODELS / "vae_tiny",
        t5_path=_TINY_MODELS / "t5_tiny",
        tokenizer_path=DATA_SAMPLES / "tokenizer",
        model_path=_TINY_MODELS / "stdit2_tiny",
        num_frames=16,
        image_size=(64, 64),
        fps=8,
        model_max_length=16,
    ),
}


def get_preset(name: str) -> Preset:
    """Look a preset up by name, with the list of valid names in the error."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(
            f"unknown preset {name!r}; choose one of {sorted(PRESETS)}"
        ) from None
