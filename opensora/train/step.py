"""One optimisation step of a diffusion transformer, and the EMA of its weights.

`TrainStep` is Open-Sora's inner loop: draw a timestep and noise per sample, compute the IDDPM
loss (epsilon MSE + the variance's VLB term) through the scheduler's `training_losses`,
differentiate, clip the global gradient norm, take an AdamW step and update the EMA weights.
It runs in PyNative or, with `mode="graph"`, compiled by `mindspore.jit`.

Nothing random lives in the model: timesteps, noise and caption dropout are drawn from the
generator each call receives, so a run seeded by (seed, step) resumes exactly. The model's own
caption dropout is therefore switched off and done here instead, with the same probability and
the same learned null caption.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from opensora.checkpoint import CheckpointError
from opensora.parallel.comm import broadcast_parameters, gradient_reducer
from opensora.parallel.context import ParallelInfo, get_parallel_info
from opensora.parallel.optimizer import ShardedOptimizer, build_optimizer

MODES = ("pynative", "graph")
MICRO_CONDITIONS = ("num_frames", "height", "width", "ar", "fps")


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


def seed_everything(seed: int) -> None:
    """Seed MindSpore's and numpy's global generators (model initialisation draws from both)."""
    ms.set_seed(seed)
    np.random.seed(seed)
