"""Scaling on paper: step time and memory per device for STDiT2 under data parallel and
optimizer parallel, from closed forms.

The model counts what a training step holds and computes:

- memory: fp32 weights, fp32 gradients, AdamW's two fp32 moments (divided by the number of
  devices with optimizer parallel), an fp32 EMA copy, and activations (per-token counts of
  what each block saves for backward; with recompute only each block's input is kept, plus
  one block's activations while it is recomputed; without FlashAttention the attention
  probabilities are stored too);
- time: matmul and attention FLOPs (x3 for forward + backward, x4 with recompute) at an
  achieved fraction of the device's peak (MFU), plus the exposed part of the ring AllReduce
  of gradients, plus the memory-bound optimizer update.

The MFU is the one free constant: `calibrate_mfu` fits it to one published measurement
(STDiT2-XL/2, 16x512x512, one Ascend 910*, 2.80 s/step), and the other published numbers
check the rest. All other constants are in `Hardware` and can be changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from opensora.models.shapes import count_stdit2_trainable, stdit2_flops, stdit2_tokens

GB = 1024**3


@dataclass(frozen=True)
class STDiT2Shape:
    """The sizes that set parameters, FLOPs and activations (defaults: STDiT2-XL/2)."""

    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    in_channels: int = 4
    patch_size: tuple[int, int, int] = (1, 2, 2)
    caption_channels: int = 4096
    text_tokens: int = 200  # model_max_length of Open-Sora 1.1
    pred_sigma: bool = True
    qk_norm: bool = True
    vae_downsample: tuple[int, int, int] = (1, 8, 8)  # (t, h, w) of the image VAE

    @property
    def config(self) -> dict[str, object]:
        """The STDiT2 constructor keywords of this shape (what `opensora.models.shapes` reads)."""
        return dict(hidden_size=self.hidden_size, depth=self.depth, num_heads=self.num_heads,
                    mlp_ratio=self.mlp_ratio, in_channels=self.in_channels,
                    patch_size=self.patch_size, caption_channels=self.caption_channels,
                    model_max_length=self.text_tokens, pred_sigma=self.pred_sigma,
                    qk_norm=self.qk_norm)

    def parameters(self) -> int:
        """Trained parameters (the null-caption embedding and RoPE table are buffers)."""
        return count_stdit2_trainable(**self.config)

    def latent(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(T, H, W) of the VAE latent of a clip."""
        dt, dh, dw = self.vae_downsample
        return frames // dt, height // dh, width // dw

    def tokens(self, frames: int, height: int, width: int) -> tuple[int, int]:
        """(T, S): latent frames after patching, and spatial tokens per frame."""
        return stdit2_tokens(self.latent(frames, height, width), self.patch_size)

    def forward_flops(self, frames: int, height: int, width: int, batch: int = 1) -> float:
        """Forward matmul FLOPs (2 per multiply-add) of the transformer for one batch."""
        return float(sum(stdit2_flops(self.config, self.latent(frames, height, width),
                                      batch).values()))

    def block_activation_elements(self, frames: int, height: int, width: int,
                                  flash_attention: bool = True) -> float:
        """Elements one block saves for backward, per sample.

        Per token and hidden unit: spatial and temporal attention 8 each (norm input,
        modulated input, q k v, normalised q k, output), cross-attention 3 (input, q,
        output), MLP 1 + 2*mlp_ratio (input, fc1 output, GELU output), 3 gated residuals.
        Without FlashAttention each attention also keeps its probability matrix.
        """
        t, s = self.tokens(frames, height, width)
        n, h = t * s, self.hidden_size
        per_token = 8 + 8 + 3 + (1 + 2 * self.mlp_ratio) + 3
        elements = per_token * n * h
        if not flash_attention:
            elements += self.num_heads * (t * s * s + s * t * t + n * self.text_tokens)
        return float(elements)


@dataclass(frozen=True)
class Hardware:
    """Device and network constants (defaults: an Ascend 910*-class NPU, 8 per node)."""

    name: str = "Ascend 910*"
    peak_tflops: float = 313.0  # dense bf16; approximate vendor figure, the MFU absorbs it
    memory_gb: float = 64.0
    memory_bandwidth_gbs: float = 1600.0
    intra_node_gbs: float = 100.0  # effective ring bandwidth inside a node (HCCS)
    inter_node_gbs: float = 25.0  # effective ring bandwidth across nodes (200 Gb/s RoCE)
    devices_per_node: int = 8
    comm_overlap: float = 0.5  # fraction of the gradient AllReduce hidden behind backward


@dataclass(frozen=True)
class TrainSetup:
    frames: int = 16
    height: int = 512
    width: int = 512
    batch_per_device: int = 1
    devices: int = 1
    optimizer_parallel: bool = False
    recompute: bool = True
    flash_attention: bool = True
    activation_bytes: int = 2  # bf16
    weight_bytes: int = 4  # fp32 master weights
    grad_bytes: int = 4
    optimizer_bytes: int = 8  # two fp32 AdamW moments
    ema_bytes: int = 4  # fp32 EMA copy (0 to disable)


@dataclass(frozen=True)
class Memory:
    weights: float
    gradients: float
    optimizer_state: float
    ema: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer_state + self.ema + self.activations

    def as_gb(self) -> dict[str, float]:
        parts = {k: v / GB for k, v in self.__dict__.items()}
        return {**parts, "total": self.total / GB}


@dataclass(frozen=True)
class StepTime:
    compute: float
    communication: float  # exposed (not overlapped) gradient AllReduce
    optimizer: float

    @property
    def total(self) -> float:
        return self.compute + self.communication + self.optimizer


def memory_per_device(model: STDiT2Shape, setup: TrainSetup) -> Memory:
    p = model.parameters()
    shards = setup.devices if setup.optimizer_parallel else 1
    block = model.block_activation_elements(setup.frames, setup.height, setup.width,
                                            setup.flash_attention)
    if setup.recompute:
        t, s = model.tokens(setup.frames, setup.height, setup.width)
        act = model.depth * t * s * model.hidden_size + block  # inputs + one live block
    else:
        act = model.depth * block
    return Memory(weights=p * setup.weight_bytes, gradients=p * setup.grad_bytes,
                  optimizer_state=p * setup.optimizer_bytes / shards,
                  ema=p * setup.ema_bytes,
                  activations=act * setup.batch_per_device * setup.activation_bytes)


def allreduce_seconds(nbytes: float, devices: int, hw: Hardware) -> float:
    """Ring AllReduce: each device sends and receives 2 (d-1)/d of the buffer."""
    if devices <= 1:
        return 0.0
    bandwidth = hw.intra_node_gbs if devices <= hw.devices_per_node else hw.inter_node_gbs
    return 2 * (devices - 1) / devices * nbytes / (bandwidth * 1e9)


def step_time(model: STDiT2Shape, setup: TrainSetup, hw: Hardware, mfu: float) -> StepTime:
    passes = 4 if setup.recompute else 3  # forward + backward (2x) (+ recomputed forward)
    flops = passes * model.forward_flops(setup.frames, setup.height, setup.width,
                                         setup.batch_per_device)
    compute = flops / (hw.peak_tflops * 1e12 * mfu)
    p = model.parameters()
    # Optimizer parallel moves the same bytes (reduce-scatter + all-gather = one AllReduce).
    comm = (1 - hw.comm_overlap) * allreduce_seconds(p * setup.grad_bytes, setup.devices, hw)
    shards = setup.devices if setup.optimizer_parallel else 1
    update_bytes = p * (2 * setup.weight_bytes + setup.grad_bytes
                        + 2 * setup.optimizer_bytes) / shards + 2 * p * setup.ema_bytes
    return StepTime(compute, comm, update_bytes / (hw.memory_bandwidth_gbs * 1e9))


def calibrate_mfu(model: STDiT2Shape, setup: TrainSetup, hw: Hardware,
                  measured_s: float) -> float:
    """The MFU at which `step_time` reproduces a measured single-device step time."""
    zero = step_time(model, setup, hw, mfu=1.0)
    compute_at_peak = zero.compute
    rest = zero.communication + zero.optimizer
    if measured_s <= rest:
        raise ValueError(f"measured {measured_s} s is below the non-compute time {rest:.3f} s")
    return compute_at_peak / (measured_s - rest)


@dataclass(frozen=True)
class Published:
    """A training speed published for the MindSpore Open-Sora port (mindone,
    examples/opensora_hpcai/README.md, Open-Sora 1.1 table; bf16, batch 1 per device,
    T5 and VAE outputs cached)."""

    devices: int
    frames: int
    height: int
    width: int
    seconds_per_step: float
    context: str


PUBLISHED: tuple[Published, ...] = (
    Published(1, 16, 512, 512, 2.80, "D910*, MindSpore 2.3"),
    Published(8, 16, 512, 512, 2.00, "D910*, MindSpore 2.3 master (0615), jit O1"),
    Published(8, 64, 512, 512, 8.30, "D910*, MindSpore 2.3 master (0615), jit O1"),
)


@dataclass
class ScalingRow:
    devices: int
    frames: int
    optimizer_parallel: bool
    recompute: bool
    memory_gb: dict[str, float] = field(default_factory=dict)
    step_s: float = 0.0
    samples_per_s: float = 0.0
    fits: bool = True


def scaling_table(model: STDiT2Shape, hw: Hardware, mfu: float,
                  devices: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64),
                  frames: tuple[int, ...] = (16, 64), base: TrainSetup | None = None
                  ) -> list[ScalingRow]:
    """Every combination of devices x frames x optimizer parallel x recompute."""
    base = base or TrainSetup()
    rows = []
    for f in frames:
        for recompute in (False, True):
            for opt in (False, True):
                for d in devices:
                    setup = replace(base, frames=f, devices=d, optimizer_parallel=opt,
                                    recompute=recompute)
                    mem = memory_per_device(model, setup)
                    t = step_time(model, setup, hw, mfu).total
                    rows.append(ScalingRow(d, f, opt, recompute, mem.as_gb(), t,
                                           d * setup.batch_per_device / t,
                                           mem.total / GB <= hw.memory_gb))
    return rows
