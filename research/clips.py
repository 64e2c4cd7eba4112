"""Training clips of the committed tiny preset as probe batches (latents, captions, conditions).

Shared by the probes in this folder; run them from the repository root, e.g.
`python research/temporal_probe.py`.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator

import mindspore as ms
import numpy as np

from opensora.data.video import read_video
from opensora.models.text_encoder import T5Encoder
from opensora.models.vae import VideoAutoencoderKL
from opensora.presets import DATA_SAMPLES, Preset, build_model, get_preset
from opensora.train import caption_embeddings, micro_condition_arrays


def committed_tiny() -> tuple[Preset, ms.nn.Cell, VideoAutoencoderKL, T5Encoder]:
    """The tiny preset with its committed STDiT2, VAE and T5, the model in inference mode."""
    preset = get_preset("tiny")
    model = build_model(preset)
    model.set_train(False)
    vae = VideoAutoencoderKL.from_pretrained(preset.vae_path)
    text_encoder = T5Encoder(preset.t5_path, preset.tokenizer_path,
                             model_max_length=preset.model_max_length)
    return preset, model, vae, text_encoder


def training_batches(preset: Preset, vae: VideoAutoencoderKL, text_encoder: T5Encoder,
                     count: int, batch_size: int = 4) -> Iterator[dict[str, np.ndarray]]:
    """The first `count` batches of `data_samples/video_caption.csv`, in csv order."""
    with (DATA_SAMPLES / "video_caption.csv").open() as handle:
        rows = list(csv.DictReader(handle))[: count * batch_size]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        video = np.stack([read_video(DATA_SAMPLES / r["video"], num_frames=preset.num_frames,
                                     frame_interval=preset.frame_interval,
                                     size=preset.image_size) for r in chunk])
        x = vae.encode(ms.Tensor(video), sample_posterior=False).asnumpy()
        captions = [r["caption"] for r in chunk]
        y, mask = caption_embeddings(text_encoder, captions)
        micro = micro_condition_arrays(len(chunk), preset.num_frames, preset.image_size,
                                       preset.fps)
        yield {"x": x, "y": y, "mask": mask, "caption": np.array(captions), **micro}
