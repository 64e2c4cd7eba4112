"""Training: one optimisation step, and a loop that checkpoints, resumes and reports.

`TrainStep` is Open-Sora's inner loop: draw a timestep and noise per sample, compute the IDDPM
loss (epsilon MSE + the variance's VLB term) through the scheduler's `training_losses`,
differentiate, clip the global gradient norm, take an AdamW step and update the EMA weights.
It runs in PyNative or, with `mode="graph"`, compiled by `mindspore.jit`.

`Trainer` feeds it batches from `opensora.data.dataset`, writes `loss.csv`, calls callbacks
(loss history, live plots, samples) and checkpoints every `ckpt_every` steps into
`output_dir/checkpoints/step_NNNNNN/` (model, EMA, optimizer moments, step), keeping the last
`keep_last`. Restarting the same job resumes from the newest checkpoint that reads back whole.

Resuming is exact because nothing random depends on history: the batch of step s, its frame
windows, timesteps, noise and caption dropout are all drawn from generators seeded by
(seed, s). The model's own caption dropout is therefore switched off and done here instead,
with the same probability and the same learned null caption.
"""

from __future__ import annotations

import contextlib
import csv
import inspect
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from opensora.checkpoint import (
    CheckpointError,
    atomic_write,
    load_checkpoint,
    read_state_dict,
    save_state_dict,
)
from opensora.parallel.comm import (
    all_reduce_mean,
    broadcast_parameters,
    gather_step_times,
    gradient_reducer,
)
from opensora.parallel.context import ParallelInfo, get_parallel_info
from opensora.parallel.data import shard_plan
from opensora.parallel.optimizer import ShardedOptimizer, build_optimizer

MODES = ("pynative", "graph")
MICRO_CONDITIONS = ("num_frames", "height", "width", "ar", "fps")
# latents (B, C, T, H, W) -> x_mask (B, T) bool; or an opensora.conditioning.MaskGenerator
MaskGenerator = Callable[[Tensor], Any]


# ---------------------------------------------------------------------------------------------
# EMA


class EMA(nn.Cell):
    """Exponential moving average of a model's trainable weights (Open-Sora's `update_ema`)."""

    def __init__(self, model: nn.Cell, decay: float = 0.9999):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.names = [name for name, p in model.parameters_and_names() if p.requires_grad]
        self.params = ParameterTuple(p for p in model.get_parameters() if p.requires_grad)
        self.ema_params = ParameterTuple(
            Parameter(Tensor(p.asnumpy()), name=f"ema.{name}", requires_grad=False)
            for name, p in zip(self.names, self.params))

    def construct(self) -> Tensor:
        decay = self.decay
        for ema, param in zip(self.ema_params, self.params):
            ops.assign(ema, ema * decay + param * (1.0 - decay))
        return ops.zeros((), ms.float32)

    def state_dict(self, model: nn.Cell) -> dict[str, np.ndarray]:
        """The model's state dict with EMA values for the trained weights (loads into the
        model like any checkpoint)."""
        state = {name: p.asnumpy() for name, p in model.parameters_and_names()}
        for name, ema in zip(self.names, self.ema_params):
            state[name] = ema.asnumpy()
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        missing = [name for name in self.names if name not in state]
        if missing:
            raise CheckpointError(f"EMA state lacks {len(missing)} weight(s): {missing[:5]}")
        for name, ema in zip(self.names, self.ema_params):
            ema.set_data(Tensor(np.asarray(state[name], np.float32)))


# ---------------------------------------------------------------------------------------------
# the step


def takes_micro_conditions(model: nn.Cell) -> bool:
    """True for STDiT2-like models, whose construct takes Open-Sora 1.1's micro-conditions."""
    return all(name in inspect.signature(model.construct).parameters
               for name in MICRO_CONDITIONS)


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def _check_dtype(dtype: str) -> ms.Type | None:
    """fp32 everywhere; bf16 / fp16 (auto mixed precision) only where the device has them."""
    if dtype in ("fp32", "float32"):
        return None
    table = {"bf16": ms.bfloat16, "fp16": ms.float16}
    if dtype not in table:
        raise ValueError(f"dtype must be 'fp32', 'bf16' or 'fp16', got {dtype!r}")
    if ms.get_context("device_target") == "CPU":
        raise ValueError(f"dtype {dtype!r} is not supported on CPU; train in 'fp32' there")
    return table[dtype]


class TrainStep:
    """One optimisation step of a diffusion transformer under an IDDPM scheduler.

    Call with a batch of latents `x` (B, C, T, H, W), caption features `y` (B, 1, L, C) and
    mask (B, L), the micro-conditions (B,) that STDiT2 takes, an optional `x_mask` (B, T) and
    a numpy Generator for timesteps, noise and caption dropout; returns the mean loss.

    `loss_scale` (a number, or "dynamic") scales the loss for fp16 / bf16 and skips steps
    whose gradients overflow; leave it None in fp32. `recompute` recomputes every transformer
    block in the backward pass instead of storing its activations.

    Under msrun (`opensora.parallel.init_parallel` called first) each rank differentiates its
    share of the global batch, gradients are averaged over ranks by AllReduce before clipping,
    and with `parallel.optimizer_parallel` the AdamW moments are sharded (`ShardedOptimizer`;
    its update then runs outside the compiled graph). Alone it is the plain single-process step.
    """

    def __init__(self, model: nn.Cell, diffusion: Any, lr: float = 1e-4,
                 weight_decay: float = 0.0, adam_eps: float = 1e-8, grad_clip: float | None = 1.0,
                 ema_decay: float | None = 0.9999, mode: str = "pynative",
                 recompute: bool = False, dtype: str = "fp32",
                 loss_scale: float | str | None = None,
                 caption_dropout: float | None = None, parallel: ParallelInfo | None = None):
        self.model = model
        self.parallel = parallel or get_parallel_info()
        self.diffusion = diffusion
        self.mode = _check_mode(mode)
        amp_dtype = _check_dtype(dtype)
        if amp_dtype is not None:
            ms.amp.auto_mixed_precision(model, amp_level="O2", dtype=amp_dtype)
        if recompute:
            blocks = getattr(model, "blocks", None)
            if blocks is None:
                raise ValueError(f"{type(model).__name__} has no `blocks` to recompute")
            for block in blocks:
                block.recompute()
        embedder = getattr(model, "y_embedder", None)
        self.null_caption = getattr(embedder, "y_embedding", None)
        default_dropout = getattr(embedder, "uncond_prob", 0.0)
        self.caption_dropout = float(default_dropout if caption_dropout is None
                                     else caption_dropout)
        if self.caption_dropout > 0 and self.null_caption is None:
            raise ValueError("caption dropout needs the model's learned null caption "
                             "(y_embedder.y_embedding)")
        # randomness lives in the step's generator; the model runs deterministically
        model.set_train(False)
        self.micro_conditions = takes_micro_conditions(model)
        self.lr = float(lr)
        self.grad_clip = grad_clip
        params = model.trainable_params()
        broadcast_parameters(params, root=0, info=self.parallel)  # one start on every rank
        self.optimizer = build_optimizer(
            params, lambda ps: nn.AdamWeightDecay(ps, learning_rate=self.lr, eps=adam_eps,
                                                  weight_decay=weight_decay), self.parallel)
        self.sharded = isinstance(self.optimizer, ShardedOptimizer)
        self.reducer = gradient_reducer(params, self.parallel)
        self.ema = EMA(model, ema_decay) if ema_decay is not None else None
        if loss_scale is None:
            self.scaler = None
        elif loss_scale == "dynamic":
            self.scaler = ms.amp.DynamicLossScaler(2.0**16, 2, 1000)
        else:
            self.scaler = ms.amp.StaticLossScaler(float(loss_scale))
        self._grad_fn = ms.value_and_grad(self._forward, None, ParameterTuple(params))
        if self.sharded:  # the sharded update broadcasts in Python: compile the gradients only
            grads = ms.jit(self._reduced_grads) if self.mode == "graph" else self._reduced_grads
            self._step = lambda *args: self._apply_sharded(*grads(*args))
        else:
            self._step = ms.jit(self._update) if self.mode == "graph" else self._update

    # -- the traced parts

    def _forward(self, x: Tensor, t: Tensor, noise: Tensor, y: Tensor, mask: Tensor,
                 drop: Tensor, x_mask: Tensor | None, num_frames: Tensor, height: Tensor,
                 width: Tensor, ar: Tensor, fps: Tensor) -> Tensor:
        if self.caption_dropout > 0:
            null = self.null_caption.astype(y.dtype)[None, None]
            y = ops.where(drop.reshape(-1, 1, 1, 1), null, y)
        # dict literals only: graph mode cannot trace dict.update
        if self.micro_conditions:
            kwargs = {"y": y, "mask": mask, "x_mask": x_mask, "num_frames": num_frames,
                      "height": height, "width": width, "ar": ar, "fps": fps}
        else:
            kwargs = {"y": y, "mask": mask, "x_mask": x_mask}
        losses = self.diffusion.training_losses(self.model, x, t, kwargs, noise, x_mask)
        loss = losses["loss"].mean()
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        return loss

    def _update(self, x: Tensor, t: Tensor, noise: Tensor, y: Tensor, mask: Tensor,
                drop: Tensor, x_mask: Tensor | None, num_frames: Tensor, height: Tensor,
                width: Tensor, ar: Tensor, fps: Tensor) -> Tensor:
        loss, grads = self._grad_fn(x, t, noise, y, mask, drop, x_mask, num_frames, height,
                                    width, ar, fps)
        if self.scaler is not None:
            loss = self.scaler.unscale(loss)
            grads = self.scaler.unscale(grads)
            finite = ms.amp.all_finite(grads)
            if isinstance(self.scaler, ms.amp.DynamicLossScaler):
                self.scaler.adjust(finite)
            if finite:
                self._apply(grads)
        else:
            self._apply(grads)
        return loss

    def _apply(self, grads: tuple) -> None:
        grads = self.reducer(grads)
        if self.grad_clip is not None and self.grad_clip > 0:
            grads = ops.clip_by_global_norm(grads, self.grad_clip)
        self.optimizer(grads)
        if self.ema is not None:
            self.ema()

    def _reduced_grads(self, *args: Tensor) -> tuple[Tensor, tuple]:
        loss, grads = self._grad_fn(*args)
        grads = self.reducer(grads)
        if self.grad_clip is not None and self.grad_clip > 0:
            grads = ops.clip_by_global_norm(grads, self.grad_clip)
        return loss, grads

    def _apply_sharded(self, loss: Tensor, grads: tuple) -> Tensor:
        if self.scaler is not None:
            raise ValueError("loss scaling is not supported with the sharded optimizer")
        self.optimizer(grads)
        if self.ema is not None:
            self.ema()
        return loss

    # -- the call

    def __call__(self, x: np.ndarray | Tensor, y: np.ndarray | Tensor, mask: np.ndarray | Tensor,
                 rng: np.random.Generator, x_mask: np.ndarray | Tensor | None = None,
                 **micro: np.ndarray) -> float:
        x = x if isinstance(x, Tensor) else Tensor(np.asarray(x, np.float32))
        batch = x.shape[0]
        # drawn for the global batch, then this rank's rows (`shard_batch` order), so W
        # workers see the same timesteps and noise per sample as one process would
        world, rank = self.parallel.world_size, self.parallel.rank
        total = batch * world
        mine = slice(rank, total, world)
        t = Tensor(rng.integers(0, self.diffusion.num_timesteps, size=total)[mine]
                   .astype(np.int32))
        noise = Tensor(rng.standard_normal((total, *x.shape[1:])).astype(np.float32)[mine])
        drop = Tensor(rng.random(total)[mine] < self.caption_dropout)
        y = y if isinstance(y, Tensor) else Tensor(np.asarray(y, np.float32))
        if y.ndim == 3:  # (B, L, C) from a cache -> (B, 1, L, C)
            y = y[:, None]
        mask = mask if isinstance(mask, Tensor) else Tensor(np.asarray(mask, np.int32))
        if x_mask is not None and not isinstance(x_mask, Tensor):
            x_mask = Tensor(np.asarray(x_mask, np.bool_))
        conds = []
        for name in MICRO_CONDITIONS:
            value = micro.get(name)
            if value is None:
                if self.micro_conditions:
                    raise ValueError(f"{type(self.model).__name__} needs the micro-condition "
                                     f"{name!r} with every batch")
                value = np.zeros(batch, np.float32)
            conds.append(Tensor(np.asarray(value, np.float32).reshape(batch)))
        loss = self._step(x, t, noise, y, mask, drop, x_mask, *conds)
        return float(loss.asnumpy())

    # -- state

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """AdamW moments and step counter (the model's own weights are saved separately).
        Sharded, this gathers every rank's share: a collective call all ranks must make."""
        if self.sharded:
            return self.optimizer.gather_state()
        model_ids = {id(p) for p in self.model.get_parameters()}
        return {p.name: p.asnumpy() for p in self.optimizer.get_parameters()
                if id(p) not in model_ids}

    def load_optimizer_state(self, state: Mapping[str, np.ndarray]) -> None:
        if self.sharded:
            try:
                self.optimizer.load_state(dict(state))
            except KeyError as exc:
                raise CheckpointError(str(exc)) from exc
            return
        own = {p.name: p for p in self.optimizer.get_parameters()}
        model_ids = {id(p) for p in self.model.get_parameters()}
        wanted = {name for name, p in own.items() if id(p) not in model_ids}
        missing = sorted(wanted - set(state))
        if missing:
            raise CheckpointError(f"optimizer state lacks {len(missing)} tensor(s): "
                                  f"{missing[:5]}")
        for name in wanted:
            param = own[name]
            value = np.asarray(state[name])
            if value.size == 1 and param.size == 1:  # scalars come back from files as (1,)
                value = value.reshape(param.shape)
            if tuple(value.shape) != tuple(param.shape):
                raise CheckpointError(f"optimizer tensor {name}: checkpoint {value.shape} vs "
                                      f"{tuple(param.shape)}")
            param.set_data(Tensor(value, dtype=param.dtype))


# ---------------------------------------------------------------------------------------------
# checkpoints


CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors", "state.json")


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """Finished checkpoints under output_dir/checkpoints, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")
             and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def save_checkpoint(output_dir: str | os.PathLike, step: int, train_step: TrainStep,
                    extra: Mapping[str, Any] | None = None, keep_last: int | None = 3,
                    optimizer_state: Mapping[str, np.ndarray] | None = None) -> Path:
    """Write step_NNNNNN/ atomically (a temp folder renamed into place) and prune old ones."""
    root = Path(output_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_state_dict(train_step.model, tmp / "model.safetensors")
    save_state_dict(dict(optimizer_state) if optimizer_state is not None
                    else train_step.optimizer_state(), tmp / "optimizer.safetensors")
    if train_step.ema is not None:
        save_state_dict(train_step.ema.state_dict(train_step.model), tmp / "ema.safetensors")
    state = {"step": int(step), **(dict(extra) if extra else {})}
    if hasattr(train_step.model, "config"):
        state["model_config"] = train_step.model.config
    with atomic_write(tmp / "state.json", "w") as handle:
        json.dump(state, handle, indent=1)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep_last:
        for old in checkpoint_dirs(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_training_checkpoint(folder: str | os.PathLike, train_step: TrainStep) -> dict[str, Any]:
    """Restore model, optimizer and EMA from one checkpoint folder; returns its state.json.

    Everything is read and checked before anything is changed, so a corrupt checkpoint
    raises CheckpointError and leaves the model as it was.
    """
    folder = Path(folder)
    try:
        state = json.loads((folder / "state.json").read_text())
        model_state = read_state_dict(folder / "model.safetensors")
        optim_state = read_state_dict(folder / "optimizer.safetensors")
        ema_state = (read_state_dict(folder / "ema.safetensors")
                     if train_step.ema is not None else None)
    except (OSError, ValueError, CheckpointError) as exc:
        raise CheckpointError(f"{folder}: unreadable checkpoint ({exc})") from exc
    if "step" not in state:
        raise CheckpointError(f"{folder}/state.json has no step")
    load_checkpoint(train_step.model, model_state, strict=True)
    train_step.load_optimizer_state(optim_state)
    if ema_state is not None:
        train_step.ema.load_state_dict(ema_state)
    return state


def restore_latest(output_dir: str | os.PathLike, train_step: TrainStep) -> tuple[int, Path | None]:
    """Resume from the newest checkpoint that loads; warn about and skip corrupt ones."""
    for folder in reversed(checkpoint_dirs(output_dir)):
        try:
            state = load_training_checkpoint(folder, train_step)
        except CheckpointError as exc:
            warnings.warn(f"checkpoint {folder.name} is corrupt, falling back to the previous "
                          f"one: {str(exc).splitlines()[0]}", stacklevel=2)
            continue
        return int(state["step"]), folder
    return 0, None


# ---------------------------------------------------------------------------------------------
# the loss log


LOSS_COLUMNS = ("step", "loss", "seconds", "epoch")


def read_loss_csv(path: str | os.PathLike) -> list[dict[str, float]]:
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def _truncate_csv(path: Path, last_step: int) -> None:
    """Keep the header and the rows up to `last_step` of a per-step log (first column: step);
    a killed run may have logged past its checkpoint."""
    if not path.is_file():
        return
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return
    kept = [r for r in rows[1:] if r and float(r[0]) <= last_step]
    with atomic_write(path, "w") as handle:
        csv.writer(handle).writerows([rows[0], *kept])


# ---------------------------------------------------------------------------------------------
# callbacks


@dataclass
class StepRecord:
    step: int
    loss: float
    seconds: float  # wall time of this step, data loading excluded
    data_seconds: float  # time spent waiting for this batch
    epoch: int


class Callback:
    """Hooks the Trainer calls; override the ones you need."""

    def on_train_start(self, trainer: Trainer, start_step: int) -> None: ...

    def on_step_end(self, trainer: Trainer, record: StepRecord) -> None: ...

    def on_checkpoint(self, trainer: Trainer, step: int, folder: Path) -> None: ...

    def on_train_end(self, trainer: Trainer) -> None: ...


@dataclass
class LossHistory(Callback):
    """Keeps every StepRecord (the loss curve and step times)."""

    records: list[StepRecord] = field(default_factory=list)

    def on_step_end(self, trainer: Trainer, record: StepRecord) -> None:
        self.records.append(record)

    @property
    def losses(self) -> list[float]:
        return [r.loss for r in self.records]

    def steps_per_second(self, skip: int = 1) -> float:
        """Optimizer steps per second, ignoring the first `skip` (compilation, warm-up)."""
        times = [r.seconds for r in self.records[skip:]] or [r.seconds for r in self.records]
        return len(times) / max(sum(times), 1e-9)


def plot_loss(steps: Sequence[float], losses: Sequence[float], ax: Any = None,
              smooth: int = 20, title: str = "training loss") -> Any:
    """Raw loss and its running mean over `smooth` steps, on a log scale."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3))
    ax.clear()
    ax.plot(steps, losses, lw=0.6, alpha=0.4, label="loss")
    if len(losses) >= 2:
        window = max(1, min(smooth, len(losses) // 2))
        kernel = np.ones(window) / window
        smoothed = np.convolve(np.asarray(losses, np.float64), kernel, mode="valid")
        ax.plot(list(steps)[window - 1:], smoothed, lw=1.5, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if len(losses) and min(losses) > 0:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.figure.tight_layout()
    return ax.figure


class LiveLossPlot(Callback):
    """Redraws the loss curve in place every `every` steps in an interactive notebook; in a
    headless run (papermill) it draws once at the end, so the output holds one final figure."""

    def __init__(self, every: int = 10, interactive: bool | None = None, smooth: int = 20):
        self.every = max(1, int(every))
        self.smooth = smooth
        self.interactive = _is_interactive() if interactive is None else interactive
        self.steps: list[int] = []
        self.losses: list[float] = []
        self._handle = None
        self._fig = None

    def on_train_start(self, trainer: Trainer, start_step: int) -> None:
        for row in read_loss_csv(trainer.loss_csv):
            if row["step"] <= start_step:
                self.steps.append(int(row["step"]))
                self.losses.append(row["loss"])

    def on_step_end(self, trainer: Trainer, record: StepRecord) -> None:
        self.steps.append(record.step)
        self.losses.append(record.loss)
        if self.interactive and record.step % self.every == 0:
            self._draw()

    def on_train_end(self, trainer: Trainer) -> None:
        self._draw()

    def _draw(self) -> None:
        import matplotlib.pyplot as plt
        from IPython.display import display

        if self._fig is None:
            self._fig, _ = plt.subplots(figsize=(6, 3))
            plt.close(self._fig)  # shown through the display handle, not by the backend
        plot_loss(self.steps, self.losses, self._fig.axes[0], self.smooth)
        if self._handle is None:
            self._handle = display(self._fig, display_id=True)
        else:
            self._handle.update(self._fig)

    @property
    def figure(self) -> Any:
        return self._fig


def _is_interactive() -> bool:
    """True inside a live Jupyter kernel with a front end; False under papermill / scripts."""
    if os.environ.get("PAPERMILL_EXECUTION") or os.environ.get("OPENSORA_HEADLESS"):
        return False
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:
        return False
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell" and \
        "papermill" not in str(getattr(shell, "parent_header", {}))


# ---------------------------------------------------------------------------------------------
# sampling (for the samples callback and the evaluation of a trained model)


def micro_condition_arrays(batch: int, num_frames: int, image_size: tuple[int, int],
                           fps: float) -> dict[str, np.ndarray]:
    height, width = image_size
    return dict(num_frames=np.full(batch, num_frames, np.float32),
                height=np.full(batch, height, np.float32),
                width=np.full(batch, width, np.float32),
                ar=np.full(batch, height / width, np.float32),
                fps=np.full(batch, fps, np.float32))


def sample_latents(model: nn.Cell, y: np.ndarray, mask: np.ndarray, latent_shape: Sequence[int],
                   image_size: tuple[int, int], fps: float, num_sampling_steps: int = 50,
                   cfg_scale: float = 4.0, seed: int = 0, progress: bool = False,
                   graph: bool = False) -> np.ndarray:
    """Guided IDDPM sampling from caption features y (B, L, C) / mask (B, L): latents
    (B, C, T, h, w). The null caption is the model's learned one, as in Open-Sora. `graph`
    runs the denoiser compiled (`opensora.models.compiled`)."""
    from opensora.models.compiled import compiled_forward
    from opensora.schedulers.iddpm import IDDPM

    was_training = model.training
    model.set_train(False)
    y = np.asarray(y, np.float32)
    if y.ndim == 3:
        y = y[:, None]
    batch = y.shape[0]
    scheduler = IDDPM(num_sampling_steps=num_sampling_steps, cfg_scale=cfg_scale)
    null = ops.tile(model.y_embedder.y_embedding[None, None], (batch, 1, 1, 1))
    rng = np.random.default_rng(seed)
    z = Tensor(rng.standard_normal((batch, *latent_shape)).astype(np.float32))
    args: dict[str, Any] = {"y": Tensor(y), "mask": Tensor(np.asarray(mask, np.int32))}
    if takes_micro_conditions(model):
        micro = micro_condition_arrays(2 * batch, latent_shape[1], image_size, fps)
        args.update({k: Tensor(v) for k, v in micro.items()})
    denoiser = compiled_forward(model) if graph else model
    out = scheduler.sample_from_embeddings(denoiser, z, args, null, generator=rng,
                                           progress=progress)
    model.set_train(was_training)
    return out.asnumpy()


def decode_latents(vae: Any, latents: np.ndarray) -> np.ndarray:
    """Latents -> clips (B, 3, T, H, W) in [-1, 1] through the video VAE."""
    return np.clip(vae.decode(Tensor(np.asarray(latents, np.float32))).asnumpy(), -1.0, 1.0)


class SampleCallback(Callback):
    """Every `every` steps (and at the end), sample one clip per caption embedding and write
    them as GIFs under output_dir/samples/step_NNNNNN/; `self.samples` maps step -> clips."""

    def __init__(self, every: int, y: np.ndarray, mask: np.ndarray, captions: Sequence[str],
                 vae: Any, latent_shape: Sequence[int], image_size: tuple[int, int],
                 fps: float = 8, num_sampling_steps: int = 25, cfg_scale: float = 4.0,
                 seed: int = 0, use_ema: bool = True,
                 on_samples: Callable[[int, np.ndarray, Sequence[str]], None] | None = None,
                 graph: bool = False):
        self.every = int(every)
        self.graph = graph
        self.y, self.mask, self.captions = y, mask, list(captions)
        self.vae = vae
        self.latent_shape = tuple(latent_shape)
        self.image_size = tuple(image_size)
        self.fps = fps
        self.num_sampling_steps = num_sampling_steps
        self.cfg_scale = cfg_scale
        self.seed = seed
        self.use_ema = use_ema
        self.on_samples = on_samples
        self.samples: dict[int, np.ndarray] = {}

    def on_step_end(self, trainer: Trainer, record: StepRecord) -> None:
        if self.every > 0 and record.step % self.every == 0:
            self.run(trainer, record.step)

    def on_train_end(self, trainer: Trainer) -> None:
        if trainer.step not in self.samples:
            self.run(trainer, trainer.step)

    def run(self, trainer: Trainer, step: int) -> np.ndarray:
        from opensora.data.video import to_uint8_frames, write_video

        model = trainer.train_step.model
        saved = None
        ema = trainer.train_step.ema
        if self.use_ema and ema is not None:
            saved = {n: p.asnumpy() for n, p in model.parameters_and_names()}
            load_checkpoint(model, ema.state_dict(model), strict=True)
        try:
            latents = sample_latents(model, self.y, self.mask, self.latent_shape,
                                     self.image_size, self.fps, self.num_sampling_steps,
                                     self.cfg_scale, self.seed, graph=self.graph)
        finally:
            if saved is not None:
                load_checkpoint(model, saved, strict=True)
        clips = decode_latents(self.vae, latents)
        folder = trainer.output_dir / "samples" / f"step_{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, clip in enumerate(clips):
            write_video(folder / f"sample_{i:02d}.gif", to_uint8_frames(clip), self.fps)
        (folder / "captions.txt").write_text("".join(c + "\n" for c in self.captions))
        self.samples[step] = clips
        if self.on_samples is not None:
            self.on_samples(step, clips, self.captions)
        return clips


# ---------------------------------------------------------------------------------------------
# the loop


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
                 mask_generator: MaskGenerator | None = None,
                 callbacks: Iterable[Callback] = (), num_workers: int = 1,
                 multiprocessing: bool = False):
        self.train_step = train_step
        self.dataset = dataset
        self.output_dir = Path(output_dir)
        self.vae = vae
        self.text_encoder = text_encoder
        self.seed = int(seed)
        self.ckpt_every = int(ckpt_every)
        self.keep_last = keep_last
        self.mask_generator = mask_generator
        self.callbacks = list(callbacks)
        self.history = LossHistory()
        self.num_workers = num_workers
        self.multiprocessing = multiprocessing
        self.step = 0
        self.resumed_from: Path | None = None
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
        self.output_dir.mkdir(parents=True, exist_ok=True)
        start = 0
        if resume:
            start, self.resumed_from = restore_latest(self.output_dir, self.train_step)
        elif checkpoint_dirs(self.output_dir):
            raise FileExistsError(f"{self.output_dir} holds checkpoints from an earlier run; "
                                  "pass resume=True to continue it or choose a new output_dir")
        self.step = start
        info = self.train_step.parallel
        callbacks = self.callbacks if info.is_main else []
        if info.is_main:
            _truncate_csv(self.loss_csv, start)
            _truncate_csv(self.output_dir / "step_times.csv", start)
        for callback in callbacks:
            callback.on_train_start(self, start)
        if start >= steps:
            for callback in callbacks:
                callback.on_train_end(self)
            return self.history
        plan = self.dataset.plan(start, steps - start)
        if info.distributed:
            plan = shard_plan(plan, info.rank, info.world_size)
        if self.num_workers > 0:
            from opensora.data.dataset import create_dataloader

            loader = create_dataloader(self.dataset, start, steps - start, self.num_workers,
                                       self.multiprocessing, plan=plan)
            batches = loader.create_dict_iterator(num_epochs=1, output_numpy=True)
        else:
            batches = (self.dataset.load_batch(spec) for spec in plan)
        everyone = [self.history, *callbacks]
        with contextlib.ExitStack() as files:
            writer = times_writer = None
            if info.is_main:
                log = files.enter_context(self.loss_csv.open("a", newline=""))
                writer = csv.writer(log)
                if log.tell() == 0:
                    writer.writerow(LOSS_COLUMNS)
                if info.distributed:
                    times_log = files.enter_context(
                        (self.output_dir / "step_times.csv").open("a", newline=""))
                    times_writer = csv.writer(times_log)
                    if times_log.tell() == 0:
                        times_writer.writerow(["step", *(f"rank_{r}"
                                                         for r in range(info.world_size))])
            waited = time.perf_counter()
            for spec, batch in zip(plan, batches):
                step = self.step + 1
                data_seconds = time.perf_counter() - waited
                began = time.perf_counter()
                rng = np.random.default_rng([self.seed, step])
                x, y, mask = self.prepare_batch(batch, rng)
                x_mask = self._frame_mask(x, step)
                micro = {k: batch[k] for k in MICRO_CONDITIONS}
                loss = self.train_step(x, y, mask, rng, x_mask=x_mask, **micro)
                seconds = time.perf_counter() - began
                if info.distributed:  # the global batch's loss; the slowest rank's time
                    loss = all_reduce_mean(loss, info)
                    rank_seconds = gather_step_times(seconds, info)
                    seconds = float(rank_seconds.max())
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss} at step {step}; lower lr or "
                                             "check the data")
                self.step = step
                if writer is not None:
                    writer.writerow([step, repr(loss), f"{seconds:.4f}", spec.epoch])
                    log.flush()
                if times_writer is not None:
                    times_writer.writerow([step, *(f"{t:.4f}" for t in rank_seconds)])
                    times_log.flush()
                record = StepRecord(step, loss, seconds, data_seconds, spec.epoch)
                for callback in everyone:
                    callback.on_step_end(self, record)
                if step % self.ckpt_every == 0 or step == steps:
                    folder = self._checkpoint(step, spec.epoch)
                    for callback in everyone:
                        callback.on_checkpoint(self, step, folder)
                waited = time.perf_counter()
        for callback in everyone:
            callback.on_train_end(self)
        return self.history


def seed_everything(seed: int) -> None:
    """Seed MindSpore's and numpy's global generators (model initialisation draws from both)."""
    ms.set_seed(seed)
    np.random.seed(seed)


# ---------------------------------------------------------------------------------------------
# jobs: caches, export, evaluation


def caption_embeddings(text_encoder: Any, captions: Sequence[str]) -> tuple[np.ndarray,
                                                                          np.ndarray]:
    """T5 features (B, L, C) and mask (B, L) of captions, as numpy."""
    out = text_encoder.encode(list(captions))
    return out["y"].asnumpy()[:, 0], out["mask"].asnumpy()


def export_pretrained(model: nn.Cell, folder: str | os.PathLike,
                      state: Mapping[str, np.ndarray] | None = None) -> Path:
    """Write `folder/config.json` + `folder/model.safetensors` (the layout of
    hpcai-tech/OpenSora-STDiT-v2-stage3), loadable with `STDiT2.from_pretrained`; `state`
    (e.g. the EMA weights) replaces the model's own."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_state_dict(dict(state) if state is not None else model, folder / "model.safetensors")
    config = dict(getattr(model, "config", {}))
    with atomic_write(folder / "config.json", "w") as handle:
        json.dump(config, handle, indent=1)
    return folder


def evaluate_captions(model: nn.Cell, vae: Any, text_encoder: Any, captions: Sequence[str],
                      num_frames: int, image_size: tuple[int, int], fps: float = 8,
                      num_sampling_steps: int = 50, cfg_scale: float = 4.0, seed: int = 0,
                      batch_size: int = 4, graph: bool = False) -> tuple[Any, np.ndarray]:
    """Sample one clip per caption and score colour and motion (`opensora.evaluation`);
    `graph` samples with the compiled denoiser."""
    from opensora.evaluation import score_clips

    latent_channels = getattr(vae, "out_channels", 4)
    factor = getattr(vae, "patch_size", (1, 8, 8))
    latent_shape = (latent_channels, num_frames, image_size[0] // factor[1],
                    image_size[1] // factor[2])
    clips = []
    for start in range(0, len(captions), batch_size):
        chunk = list(captions[start : start + batch_size])
        y, mask = caption_embeddings(text_encoder, chunk)
        latents = sample_latents(model, y, mask, latent_shape, image_size, fps,
                                 num_sampling_steps, cfg_scale, seed + start, graph=graph)
        clips.extend(decode_latents(vae, latents))
    clips = np.stack(clips)
    return score_clips(clips, captions), clips


def prepare_caches(csv_path: str | os.PathLike, cache_dir: str | os.PathLike, vae: Any,
                   text_encoder: Any, latent_folder: str | os.PathLike | None = None,
                   text_folder: str | os.PathLike | None = None,
                   progress: bool = False) -> tuple[Path, Path]:
    """Latent and T5 caches for a csv: the given folders, or built (resumably) under
    `cache_dir/latents` and `cache_dir/t5`. Returns (latent_folder, text_folder).

    A given folder is checked against the fingerprint its filler recorded (`vae.json`,
    `t5.json`): another model's cache is an error; a folder without a record is used with a
    warning, since nothing says which model filled it."""
    from opensora.data import latent_cache, text_cache

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


# ---------------------------------------------------------------------------------------------
# the command line: the same loop alone or on N workers


def main(argv: Sequence[str] | None = None) -> int:
    """Train a preset's transformer from cached latents and T5 features.

        python -m opensora.train --preset tiny --latent-folder C/latents --text-folder C/t5 \\
            --steps 100 --output-dir runs/train
        python -m opensora.parallel.launch --workers 2 -- -m opensora.train ... \\
            [--optimizer-parallel]

    `--batch-size` is the global batch; under msrun each of W workers takes batch / W of it.
    """
    import argparse

    from opensora.data.dataset import VideoCaptionDataset
    from opensora.parallel.context import init_parallel
    from opensora.presets import DATA_SAMPLES, build_model, get_preset, preset_scaling_factor
    from opensora.schedulers.iddpm import IDDPM

    parser = argparse.ArgumentParser(prog="python -m opensora.train",
                                     description=main.__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--csv", default=str(DATA_SAMPLES / "video_caption.csv"))
    parser.add_argument("--latent-folder", required=True, help="opensora.data.latent_cache output")
    parser.add_argument("--text-folder", required=True, help="opensora.data.text_cache output")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--mode", choices=MODES, default="graph")
    parser.add_argument("--dtype", default="fp32", help="fp32; bf16 / fp16 on Ascend")
    parser.add_argument("--recompute", action="store_true", help="recompute every block")
    parser.add_argument("--attn-backend", default=None, help="math | chunked | flash")
    parser.add_argument("--optimizer-parallel", action="store_true",
                        help="shard the AdamW state over the workers")
    parser.add_argument("--ckpt-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-resume", action="store_true")
    args = parser.parse_args(argv)

    info = init_parallel(optimizer_parallel=args.optimizer_parallel)
    if args.batch_size % info.world_size:
        parser.error(f"--batch-size {args.batch_size} must be a multiple of the "
                     f"{info.world_size} workers")
    preset = get_preset(args.preset)
    seed_everything(args.seed)
    overrides = {"attn_backend": args.attn_backend} if args.attn_backend else {}
    model = build_model(preset.with_paths(model_path=None), **overrides)
    dataset = VideoCaptionDataset(
        args.csv, num_frames=preset.num_frames, frame_interval=preset.frame_interval,
        image_size=preset.image_size, batch_size=args.batch_size,
        latent_folder=args.latent_folder, text_folder=args.text_folder, seed=args.seed,
        latent_scaling_factor=preset_scaling_factor(preset), warn=info.is_main)
    step = TrainStep(model, IDDPM(), lr=args.lr, grad_clip=args.grad_clip,
                     ema_decay=args.ema_decay, mode=args.mode, recompute=args.recompute,
                     dtype=args.dtype, parallel=info)
    trainer = Trainer(step, dataset, args.output_dir, seed=args.seed,
                      ckpt_every=args.ckpt_every, num_workers=0)
    began = time.perf_counter()
    history = trainer.fit(args.steps, resume=not args.no_resume)
    if info.is_main:
        done = len(history.records)
        print(f"rank 0 of {info.world_size}: {done} steps in {time.perf_counter() - began:.1f} s"
              f" ({history.steps_per_second():.3f} steps/s after the first); final loss "
              f"{history.losses[-1] if done else float('nan'):.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
