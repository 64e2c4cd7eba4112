"""Training a diffusion transformer: the step, the loop, checkpoints, callbacks, the CLI.

- `step`: `TrainStep` (IDDPM loss, AdamW, clipping, loss scaling, recompute, mixed precision,
  data / optimizer parallel) and `EMA`;
- `checkpointing`: atomic checkpoints, verified before anything is applied, resume, export;
- `callbacks`: the loss history and csv, live loss plot, sample previews;
- `sampling`: preview clips and the held-out evaluation of the weights in memory;
- `trainer`: `Trainer`, the loop, and `prepare_caches`;
- `vae`: training the tiny preset's VAE (`python -m opensora.train.vae`);
- `python -m opensora.train`: the command line, alone or under msrun.

The names below are re-exported so a notebook imports them from one place.
"""

from __future__ import annotations

from opensora.train.callbacks import (
    Callback,
    LiveLossPlot,
    LossCsv,
    LossHistory,
    SampleCallback,
    StepRecord,
    StepTimesCsv,
    plot_loss,
    read_loss_csv,
)
from opensora.train.checkpointing import (
    checkpoint_dirs,
    export_pretrained,
    load_training_checkpoint,
    restore_latest,
    save_checkpoint,
)
from opensora.train.sampling import (
    caption_embeddings,
    decode_latents,
    evaluate_captions,
    micro_condition_arrays,
    sample_latents,
)
from opensora.train.step import (
    EMA,
    MICRO_CONDITIONS,
    MODES,
    TrainStep,
    seed_everything,
    takes_micro_conditions,
)
from opensora.train.trainer import Trainer, prepare_caches

__all__ = [
    "EMA", "MICRO_CONDITIONS", "MODES", "Callback", "LiveLossPlot", "LossCsv", "LossHistory",
    "SampleCallback", "StepRecord", "StepTimesCsv", "TrainStep", "Trainer",
    "caption_embeddings", "checkpoint_dirs", "decode_latents", "evaluate_captions",
    "export_pretrained", "load_training_checkpoint", "micro_condition_arrays", "plot_loss",
    "prepare_caches", "read_loss_csv", "restore_latest", "sample_latents", "save_checkpoint",
    "seed_everything", "takes_micro_conditions",
]
