"""Named configurations: which VAE, text encoder and diffusion transformer a run uses.

`tiny` is the default everywhere: every component is small enough to train from scratch on the
bundled `data_samples/` on a CPU, so the book runs end to end on a laptop. The XL presets carry
the published Open-Sora shapes; their weights are not bundled and are passed as paths.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from opensora.models.shapes import count_stdit2_parameters, count_stdit_parameters
from opensora.models.stdit import STDiT
from opensora.models.stdit2 import STDiT2
from opensora.models.vae import SD_SCALING_FACTOR, AutoencoderKLConfig

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
    noise_schedule: str = "linear"  # IDDPM beta schedule the transformer is trained / sampled on
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
            input_sq_size=64,  # pixel side the positions are calibrated for (512 in 1.1)
            in_channels=4,
            patch_size=(1, 2, 2),
            hidden_size=96,  # STDiT2 needs a multiple of 3 (size embedders) and of 4 (2D pos)
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

# DiT-S-sized STDiT2 on the tiny VAE / T5: for benchmarks and longer CPU runs.
PRESETS["small"] = replace(
    PRESETS["tiny"],
    name="small",
    model=dict(PRESETS["tiny"].model, input_sq_size=128, hidden_size=384, depth=12, num_heads=6),
    model_path=None,
    image_size=(128, 128),
)

# The published Open-Sora shapes; weights (and the SD VAE / T5-XXL) are passed as paths.
PRESETS["STDiT-XL/2"] = Preset(
    name="STDiT-XL/2",
    model_type="STDiT",
    model=dict(
        input_size=(16, 64, 64),  # 16 x 512 x 512 video through the 8x VAE
        in_channels=4,
        patch_size=(1, 2, 2),
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        pred_sigma=True,
        caption_channels=4096,
        model_max_length=120,
        space_scale=1.0,
        time_scale=1.0,
    ),
    vae_path=None,
    t5_path=None,
    tokenizer_path=None,
    model_path=None,
    num_frames=16,
    image_size=(512, 512),
    fps=8,
    frame_interval=3,
    model_max_length=120,
)

_XL_SHARED = dict(in_channels=4, patch_size=(1, 2, 2), hidden_size=1152, depth=28,
                  num_heads=16, mlp_ratio=4.0, class_dropout_prob=0.1, pred_sigma=True,
                  caption_channels=4096)
PRESETS["STDiT2-XL/2"] = replace(
    PRESETS["STDiT-XL/2"],
    name="STDiT2-XL/2",
    model_type="STDiT2",
    model=dict(input_size=(None, None, None), input_sq_size=512, **_XL_SHARED,
               model_max_length=200, qk_norm=True),
    fps=24,
    frame_interval=1,
    model_max_length=200,
)


def build_model(preset: Preset | str, checkpoint: str | Path | None = None, **overrides: Any):
    """The preset's diffusion transformer: from `checkpoint` (or the preset's `model_path`) when
    one is given and exists, otherwise freshly initialised. `overrides` go to the constructor
    (e.g. attn_backend, enable_recompute)."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    model_cls = {"STDiT": STDiT, "STDiT2": STDiT2}[preset.model_type]
    path = Path(checkpoint) if checkpoint else preset.model_path
    if checkpoint and not Path(checkpoint).exists():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    if path is not None and path.exists():
        return model_cls.from_pretrained(path, **overrides)
    return model_cls(**{**preset.model, **overrides})


def count_model_parameters(preset: Preset | str) -> int:
    """Parameter count of the preset's transformer from its shapes alone (nothing allocated)."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    count = count_stdit2_parameters if preset.model_type == "STDiT2" else count_stdit_parameters
    return count(**preset.model)


def preset_scaling_factor(preset: Preset | str) -> float:
    """The latent scale of the preset's VAE (its config.json), SD's 0.18215 without a VAE path:
    cached latents are multiplied by it, so it must be the one the sampler decodes with."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    if preset.vae_path is None:
        return SD_SCALING_FACTOR
    return AutoencoderKLConfig.from_json(preset.vae_path / "config.json").scaling_factor


def get_preset(name: str) -> Preset:
    """Look a preset up by name, with the list of valid names in the error."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(
            f"unknown preset {name!r}; choose one of {sorted(PRESETS)}"
        ) from None
