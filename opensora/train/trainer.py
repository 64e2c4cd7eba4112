"""The training loop: batches in, optimizer steps, logs, checkpoints and resume.

`Trainer` feeds `TrainStep` batches from `opensora.data.dataset`, calls the callbacks (the loss
csv among them) and checkpoints every `ckpt_every` steps; restarting the same job resumes from
the newest checkpoint that reads back whole. Resuming is exact because nothing random depends on
history: the batch of step s, its frame windows, timesteps, noise, caption dropout and frame
masks are all drawn from generators seeded by (seed, s).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from mindspore import Tensor, ops

from opensora.data import latent_cache, text_cache
from opensora.data.dataset import create_dataloader
from opensora.parallel.comm import all_reduce_mean, gather_step_times
from opensora.parallel.data import shard_plan
from opensora.train.callbacks import Callback, LossCsv, LossHistory, StepRecord, StepTimesCsv
from opensora.train.checkpointing import checkpoint_dirs, restore_latest, save_checkpoint
from opensora.train.step import MICRO_CONDITIONS, TrainStep

# latents (B, C, T, H, W) -> x_mask (B, T) bool; or an opensora.data.mask_generator.MaskGenerator
FrameMasker = Callable[[Tensor], Any]


class Trainer:
    """Runs TrainStep over a VideoCaptionDataset with checkpoints, resume and callbacks.

    `vae` encodes clips when the dataset yields pixels; `text_encoder` (an
    `opensora.models.text_encoder.T5Encoder`) encodes captions when it yields text. With the
    latent and text caches neither is needed. `mask_generator(x)` returns the (B, T) frame
    mask of Open-Sora 1.1's mask strategies for a batch of latents (True = frame to denoise).

    Under msrun every rank runs the same loop on its share of each global batch (the plan is
    split by `shard_plan`); the logged loss is the mean over ranks, `step_times.csv` holds each
    rank's step time, and only rank 0 writes files and runs callbacks. Checkpoints do not
    depend on the number of workers, so a job may resume with a different one.
    """

    def __init__(self, train_step: TrainStep, dataset: Any, output_dir: str | os.PathLike,
                 vae: Any = None, text_encoder: Any = None, seed: int = 0,
                 ckpt_every: int = 100, keep_last: int = 3,
                 mask_generator: FrameMasker | None = None,
                 callbacks: Iterable[Callback] = (), num_workers: int = 1,
                 multiprocessing: bool = False):
        self.train_step = train_step
        self.dataset = dataset
        self.output_dir = Path(output_dir)
        self.vae = vae
        self.text_encoder = text_encoder
        self.seed = int(seed)
        self.ckpt_every = int(ckpt_every)
        if self.ckpt_every < 1:
            raise ValueError(f"ckpt_every must be at least 1 step, got {ckpt_every}")
        self.keep_last = keep_last
        self.mask_generator = mask_generator
        self.callbacks = list(callbacks)
        self.history = LossHistory()
        self.num_workers = num_workers
        self.multiprocessing = multiprocessing
        self.step = 0
        self.resumed_from: Path | None = None
        self._waited = 0.0  # when the previous step ended: the gap to the next is data time
        if not dataset.uses_text_cache and text_encoder is None:
            raise ValueError("the dataset yields captions but no text_encoder was given; pass "
                             "one or a text_folder of cached T5 embeddings")
        if not dataset.uses_latents and vae is None:
            raise ValueError("the dataset yields pixels but no vae was given; pass one or a "
                             "latent_folder of cached latents")

    @property
    def loss_csv(self) -> Path:
        return self.output_dir / "loss.csv"

    def prepare_batch(self, batch: Mapping[str, np.ndarray], rng: np.random.Generator
                      ) -> tuple[Tensor, np.ndarray, np.ndarray]:
        """A dataset batch as the model sees it: (latents, caption features, caption mask),
        encoding pixels and captions only when the dataset does not yield cached ones."""
        x = Tensor(np.asarray(batch["x"], np.float32))
        if not self.dataset.uses_latents:
            x = ops.stop_gradient(self.vae.encode(x, noise=rng))
        if self.dataset.uses_text_cache:
            y, mask = batch["y"], batch["mask"]
        else:
            captions = [str(c) for c in np.asarray(batch["caption"]).reshape(-1)]
            encoded = self.text_encoder.encode(captions)
            y, mask = encoded["y"].asnumpy(), encoded["mask"].asnumpy()
        return x, y, mask

    def _frame_mask(self, x: Tensor, step: int) -> Any:
        """The mask generator's (B, T) mask, or None. A `MaskGenerator` (an object with
        `get_masks(batch_size, num_frames)` and an `rng`) is reseeded from (seed, step) so a
        resumed run draws the same masks; a plain callable gets the latents."""
        generator = self.mask_generator
        if generator is None:
            return None
        if hasattr(generator, "get_masks"):
            if hasattr(generator, "rng"):
                generator.rng = np.random.default_rng([self.seed, step, 5])
            info = self.train_step.parallel  # global batch's masks, this rank's rows
            masks = generator.get_masks(x.shape[0] * info.world_size, x.shape[2])
            return masks[info.rank::info.world_size] if info.distributed else masks
        return generator(x)

    def _checkpoint(self, step: int, epoch: int) -> Path:
        """Rank 0 writes; a sharded optimizer's state is gathered by every rank first."""
        info = self.train_step.parallel
        folder = self.output_dir / "checkpoints" / f"step_{step:06d}"
        if not info.distributed:
            return save_checkpoint(self.output_dir, step, self.train_step,
                                   {"seed": self.seed, "epoch": epoch}, self.keep_last)
        optimizer_state = self.train_step.optimizer_state()  # collective when sharded
        if info.is_main:
            save_checkpoint(self.output_dir, step, self.train_step,
                            {"seed": self.seed, "epoch": epoch}, self.keep_last,
                            optimizer_state=optimizer_state)
        all_reduce_mean(0.0, info)  # a barrier: nobody reads a half-written checkpoint
        return folder

    def fit(self, steps: int, resume: bool = True) -> LossHistory:
        """Train until global step `steps` (a resumed run does only the remaining ones)."""
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        start = self._start_step(resume)
        self.step = start
        everyone = [self.history, *self._main_rank_callbacks()]
        for callback in everyone:
            callback.on_train_start(self, start)
        self._waited = time.perf_counter()
        for spec, batch in zip(*self._batches(start, steps)):
            record = self._train_one(spec, batch)
            for callback in everyone:
                callback.on_step_end(self, record)
            if record.step % self.ckpt_every == 0 or record.step == steps:
                folder = self._checkpoint(record.step, spec.epoch)
                for callback in everyone:
                    callback.on_checkpoint(self, record.step, folder)
            self._waited = time.perf_counter()
        for callback in everyone:
            callback.on_train_end(self)
        return self.history

    def _start_step(self, resume: bool) -> int:
        if resume:
            start, self.resumed_from = restore_latest(self.output_dir, self.train_step)
            return start
        if checkpoint_dirs(self.output_dir):
            raise FileExistsError(f"{self.output_dir} holds checkpoints from an earlier run; "
                                  "pass resume=True to continue it or choose a new output_dir")
        return 0

    def _main_rank_callbacks(self) -> list[Callback]:
        """The logs every run writes, then the user's callbacks; none on the other ranks."""
        info = self.train_step.parallel
        if not info.is_main:
            return []
        logs: list[Callback] = [LossCsv(self.loss_csv)]
        if info.distributed:
            logs.append(StepTimesCsv(self.output_dir / "step_times.csv", info.world_size))
        return [*logs, *self.callbacks]

    def _batches(self, start: int, steps: int) -> tuple[list[Any], Iterable[Any]]:
        """This rank's batch plan for steps start+1 .. steps, and the batches it loads."""
        if start >= steps:
            return [], []
        plan = self.dataset.plan(start, steps - start)
        info = self.train_step.parallel
        if info.distributed:
            plan = shard_plan(plan, info.rank, info.world_size)
        if self.num_workers > 0:
            loader = create_dataloader(self.dataset, start, steps - start, self.num_workers,
                                       self.multiprocessing, plan=plan)
            return plan, loader.create_dict_iterator(num_epochs=1, output_numpy=True)
        return plan, (self.dataset.load_batch(spec) for spec in plan)

    def _train_one(self, spec: Any, batch: Mapping[str, np.ndarray]) -> StepRecord:
        """One optimizer step on a loaded batch; its record (the global loss under msrun)."""
        step = self.step + 1
        data_seconds = time.perf_counter() - self._waited
        began = time.perf_counter()
        rng = np.random.default_rng([self.seed, step])
        x, y, mask = self.prepare_batch(batch, rng)
        micro = {k: batch[k] for k in MICRO_CONDITIONS}
        loss = self.train_step(x, y, mask, rng, x_mask=self._frame_mask(x, step), **micro)
        seconds = time.perf_counter() - began
        rank_seconds: tuple[float, ...] = ()
        info = self.train_step.parallel
        if info.distributed:  # the global batch's loss; the slowest rank's time
            loss = all_reduce_mean(loss, info)
            rank_seconds = tuple(float(t) for t in gather_step_times(seconds, info))
            seconds = max(rank_seconds)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at step {step}; lower lr or "
                                     "check the data")
        self.step = step
        return StepRecord(step, loss, seconds, data_seconds, spec.epoch, rank_seconds)


def prepare_caches(csv_path: str | os.PathLike, cache_dir: str | os.PathLike, vae: Any,
                   text_encoder: Any, latent_folder: str | os.PathLike | None = None,
                   text_folder: str | os.PathLike | None = None,
                   progress: bool = False) -> tuple[Path, Path]:
    """Latent and T5 caches for a csv: the given folders, or built (resumably) under
    `cache_dir/latents` and `cache_dir/t5`. Returns (latent_folder, text_folder).

    A given folder is checked against the fingerprint its filler recorded (`vae.json`,
    `t5.json`): another model's cache is an error; a folder without a record is used with a
    warning, since nothing says which model filled it."""
    cache_dir = Path(cache_dir)
    if latent_folder is None:
        latent_folder = cache_dir / "latents"
        latent_cache.cache_latents(csv_path, latent_folder, vae, progress=progress)
    else:
        latent_cache.check_folder(latent_folder, vae)
    if text_folder is None:
        text_folder = cache_dir / "t5"
        text_cache.cache_text_embeddings(csv_path, text_folder, text_encoder, progress=progress)
    else:
        text_cache.check_folder(text_folder, text_encoder)
    return Path(latent_folder), Path(text_folder)
