"""The Stable Diffusion VAE that Open-Sora 1.0/1.1 encode video with, frame by frame.

`AutoencoderKL` is diffusers' `AutoencoderKL` in MindSpore: the same blocks, the same
`config.json` keys and the same parameter names (`encoder.down_blocks.0.resnets.0.conv1.weight`,
`decoder.mid_block.attentions.0.to_q.weight`, ...), so a downloaded diffusers folder such as
`stabilityai/sd-vae-ft-ema` loads as it is. Older diffusers folders name the mid-block attention
`query/key/value/proj_attn` (sd-vae-ft-ema among them); both namings load.

`VideoAutoencoderKL` is Open-Sora's wrapper: a (B, C, T, H, W) clip is folded into B*T images,
pushed through the 2D VAE `micro_batch_size` frames at a time (memory stays bounded by the
micro-batch, not the clip), and latents are multiplied by the fixed scaling factor 0.18215.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import mint, nn, ops
from mindspore.common.initializer import HeUniform, Uniform, initializer

from opensora.checkpoint import (
    CheckpointError,
    LoadReport,
    load_checkpoint,
    read_state_dict,
    save_state_dict,
)
from opensora.models.attention import attention
from opensora.models.ops import expand_to

SD_SCALING_FACTOR = 0.18215
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# diffusers renamed the mid-block attention projections; checkpoints from before the rename
# (and the original LDM ones) still carry the old names.
_OLD_ATTENTION_NAMES = {
    "query": "to_q",
    "key": "to_k",
    "value": "to_v",
    "proj_attn": "to_out.0",
}


@dataclass
class AutoencoderKLConfig:
    """The `config.json` keys of diffusers' AutoencoderKL that shape the network."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: Sequence[str] = ("DownEncoderBlock2D",)
    up_block_types: Sequence[str] = ("UpDecoderBlock2D",)
    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = SD_SCALING_FACTOR
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.down_block_types = tuple(self.down_block_types)
        self.up_block_types = tuple(self.up_block_types)
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"config has {n} block_out_channels but {len(self.down_block_types)} "
                f"down_block_types and {len(self.up_block_types)} up_block_types; "
                "they must have one entry per resolution level"
            )
        bad = [t for t in self.down_block_types if t != "DownEncoderBlock2D"]
        bad += [t for t in self.up_block_types if t != "UpDecoderBlock2D"]
        if bad:
            raise ValueError(f"unsupported VAE block types {bad}; the SD VAE uses "
                             "DownEncoderBlock2D / UpDecoderBlock2D")
        if self.act_fn != "silu":
            raise ValueError(f"act_fn={self.act_fn!r} is not supported; the SD VAE uses 'silu'")
        odd = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if odd:
            raise ValueError(f"block_out_channels {odd} are not divisible by norm_num_groups="
                             f"{self.norm_num_groups}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> AutoencoderKLConfig:
        """Read a diffusers config dict; keys the network does not use are kept in `extra`."""
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in config.items() if k in known and v is not None}
        extra = {k: v for k, v in config.items() if k not in known}
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> AutoencoderKLConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: a diffusers VAE folder needs its config.json next to "
                f"{WEIGHTS_NAME}"
            )
        return cls.from_dict(json.loads(path.read_text()))

    def to_diffusers_dict(self) -> dict[str, Any]:
        """A config.json that diffusers' `AutoencoderKL.from_pretrained` also accepts."""
        out = {"_class_name": "AutoencoderKL", **self.extra}
        out.pop("_diffusers_version", None)
        for key, value in asdict(self).items():
            if key != "extra":
                out[key] = list(value) if isinstance(value, tuple) else value
        return out


# --------------------------------------------------------------------------------------------
# layers


class GroupNorm(nn.Cell):
    """torch.nn.GroupNorm with parameters named `weight` / `bias` (MindSpore's: gamma / beta)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.num_groups = num_groups
        self.eps = eps
        self.weight = ms.Parameter(ms.Tensor(np.ones(num_channels, np.float32)), name="weight")
        self.bias = ms.Parameter(ms.Tensor(np.zeros(num_channels, np.float32)), name="bias")

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        return mint.nn.functional.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class Conv2d(nn.Cell):
    """torch.nn.Conv2d (weight (out, in, k, k), bias (out,)) as unfold (im2col) + one matmul.

    MindSpore's CPU Conv2D kernel is 10-70x slower than its Im2Col + MatMul here; the price is
    a k*k times larger temporary, which `micro_batch_size` keeps bounded for video.
    `padding` is an int or (top, bottom, left, right), like diffusers' explicit VAE padding.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, padding: int | tuple[int, int, int, int] = 1):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        pad = (padding,) * 4 if isinstance(padding, int) else tuple(padding)
        self.padding = (pad[2], pad[3], pad[0], pad[1])  # ops.pad order: left, right, top, bottom
        self.needs_pad = any(p > 0 for p in pad)
        fan_in = in_channels * kernel_size * kernel_size
        self.weight = ms.Parameter(
            initializer(HeUniform(math.sqrt(5)),
                        (out_channels, in_channels, kernel_size, kernel_size), ms.float32),
            name="weight")
        bound = 1.0 / math.sqrt(fan_in)
        self.bias = ms.Parameter(initializer(Uniform(bound), (out_channels,), ms.float32),
                                 name="bias")

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        n, c, h, w = x.shape
        k, s = self.kernel_size, self.stride
        weight = self.weight.reshape(self.out_channels, c * k * k)
        if self.needs_pad:
            x = ops.pad(x, self.padding)
            h, w = x.shape[2], x.shape[3]
        out_h, out_w = (h - k) // s + 1, (w - k) // s + 1
        if k == 1 and s == 1:
            columns = x.reshape(n, c, h * w)
        else:  # (N, C*k*k, out_h*out_w), rows ordered (channel, ky, kx) like the weight
            columns = ops.unfold(x, k, stride=s)
        out = ops.matmul(weight, columns)
        out = out + expand_to(self.bias.reshape(1, self.out_channels, 1), out.shape)
        return out.reshape(n, self.out_channels, out_h, out_w)


def conv2d(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
           padding: int | tuple[int, int, int, int] = 1) -> Conv2d:
    return Conv2d(in_channels, out_channels, kernel_size, stride, padding)


class ResnetBlock2D(nn.Cell):
    """norm-SiLU-conv twice plus a (1x1-projected when widths differ) skip connection."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float = 1e-6):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, eps)
        self.conv1 = conv2d(in_channels, out_channels)
        self.norm2 = GroupNorm(groups, out_channels, eps)
        self.conv2 = conv2d(out_channels, out_channels)
        self.conv_shortcut = (
            conv2d(in_channels, out_channels, 1, padding=0) if in_channels != out_channels else None
        )

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        h = self.conv1(ops.silu(self.norm1(x)))
        h = self.conv2(ops.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample2D(nn.Cell):
    """Stride-2 3x3 conv after padding one pixel on the bottom and right only, as diffusers
    does for the VAE (`padding=0` plus an explicit (0, 1, 0, 1) pad)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv2d(channels, channels, 3, stride=2, padding=(0, 1, 0, 1))

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        return self.conv(x)


class Upsample2D(nn.Cell):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv2d(channels, channels)

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        b, c, h, w = x.shape
        x = ops.broadcast_to(x.reshape(b, c, h, 1, w, 1), (b, c, h, 2, w, 2))
        return self.conv(x.reshape(b, c, h * 2, w * 2))


class VAEAttention(nn.Cell):
    """Single-head self-attention over the H*W positions of the lowest-resolution feature map,
    with a GroupNorm in front and a residual around it (diffusers' `Attention` as the VAE
    configures it: heads = 1, head dim = channels)."""

    def __init__(self, channels: int, groups: int, eps: float = 1e-6,
                 attention_backend: str = "math"):
        super().__init__()
        self.group_norm = GroupNorm(groups, channels, eps)
        self.to_q = nn.Dense(channels, channels)
        self.to_k = nn.Dense(channels, channels)
        self.to_v = nn.Dense(channels, channels)
        self.to_out = nn.CellList([nn.Dense(channels, channels)])
        self.attention_backend = attention_backend

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).reshape(b, c, h * w).swapaxes(1, 2)  # (B, HW, C)
        q = self.to_q(tokens).reshape(b, 1, h * w, c)
        k = self.to_k(tokens).reshape(b, 1, h * w, c)
        v = self.to_v(tokens).reshape(b, 1, h * w, c)
        out = attention(q, k, v, None, self.attention_backend).reshape(b, h * w, c)
        out = self.to_out[0](out)
        return x + out.swapaxes(1, 2).reshape(b, c, h, w)


class UNetMidBlock2D(nn.Cell):
    """resnet, attention, resnet at the bottom of both encoder and decoder."""

    def __init__(self, channels: int, groups: int, add_attention: bool = True,
                 attention_backend: str = "math"):
        super().__init__()
        self.resnets = nn.CellList([ResnetBlock2D(channels, channels, groups),
                                    ResnetBlock2D(channels, channels, groups)])
        self.attentions = (
            nn.CellList([VAEAttention(channels, groups, attention_backend=attention_backend)])
            if add_attention else None
        )

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nn.Cell):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int,
                 add_downsample: bool):
        super().__init__()
        self.resnets = nn.CellList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups)
            for i in range(num_layers)
        ])
        self.downsamplers = nn.CellList([Downsample2D(out_channels)]) if add_downsample else None

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Cell):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int,
                 add_upsample: bool):
        super().__init__()
        self.resnets = nn.CellList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups)
            for i in range(num_layers)
        ])
        self.upsamplers = nn.CellList([Upsample2D(out_channels)]) if add_upsample else None

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Cell):
    """Image -> 2 * latent_channels moments (mean and log-variance), downsampled by
    2 ** (number of blocks - 1)."""

    def __init__(self, config: AutoencoderKLConfig, attention_backend: str = "math"):
        super().__init__()
        widths = config.block_out_channels
        groups = config.norm_num_groups
        self.conv_in = conv2d(config.in_channels, widths[0])
        self.down_blocks = nn.CellList([
            DownEncoderBlock2D(widths[max(i - 1, 0)], width, config.layers_per_block, groups,
                               add_downsample=i < len(widths) - 1)
            for i, width in enumerate(widths)
        ])
        self.mid_block = UNetMidBlock2D(widths[-1], groups, config.mid_block_add_attention,
                                        attention_backend)
        self.conv_norm_out = GroupNorm(groups, widths[-1])
        self.conv_out = conv2d(widths[-1], 2 * config.latent_channels)

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(ops.silu(self.conv_norm_out(x)))


class Decoder(nn.Cell):
    """Latent -> image, mirroring the encoder with one extra resnet per level."""

    def __init__(self, config: AutoencoderKLConfig, attention_backend: str = "math"):
        super().__init__()
        widths = tuple(reversed(config.block_out_channels))
        groups = config.norm_num_groups
        self.conv_in = conv2d(config.latent_channels, widths[0])
        self.mid_block = UNetMidBlock2D(widths[0], groups, config.mid_block_add_attention,
                                        attention_backend)
        self.up_blocks = nn.CellList([
            UpDecoderBlock2D(widths[max(i - 1, 0)], width, config.layers_per_block + 1, groups,
                             add_upsample=i < len(widths) - 1)
            for i, width in enumerate(widths)
        ])
        self.conv_norm_out = GroupNorm(groups, widths[-1])
        self.conv_out = conv2d(widths[-1], config.out_channels)

    def construct(self, z: ms.Tensor) -> ms.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(ops.silu(self.conv_norm_out(x)))


# --------------------------------------------------------------------------------------------
# posterior


def make_noise(shape: Sequence[int], noise: np.random.Generator | int | None) -> np.ndarray:
    """Standard normal noise from a numpy Generator or seed, so a sample is reproducible
    across PyNative, graph mode and machines (MindSpore's own RNG is none of these)."""
    rng = noise if isinstance(noise, np.random.Generator) else np.random.default_rng(noise)
    return rng.standard_normal(tuple(shape), dtype=np.float32)


def split_moments(moments: ms.Tensor) -> tuple[ms.Tensor, ms.Tensor]:
    """Encoder moments -> (mean, log-variance clamped to [-30, 20] as in the LDM code, so
    exp() neither overflows nor collapses std to exactly zero)."""
    mean, logvar = ops.chunk(moments, 2, axis=1)
    return mean, ops.clamp(logvar, -30.0, 20.0)


class DiagonalGaussianDistribution:
    """The encoder's posterior q(z|x) = N(mean, exp(logvar)), per latent element (a plain
    Python object for PyNative use; graph-mode code calls `split_moments` directly)."""

    def __init__(self, moments: ms.Tensor, deterministic: bool = False):
        self.mean, self.logvar = split_moments(moments)
        self.deterministic = deterministic
        if deterministic:
            self.std = ops.zeros_like(self.mean)
            self.var = ops.zeros_like(self.mean)
        else:
            self.std = ops.exp(0.5 * self.logvar)
            self.var = ops.exp(self.logvar)

    def sample(self, noise: np.random.Generator | int | ms.Tensor | None = None) -> ms.Tensor:
        """mean + std * eps; `noise` is eps itself (a Tensor), or a Generator / seed for it."""
        eps = noise if isinstance(noise, ms.Tensor) else ms.Tensor(
            make_noise(self.mean.shape, noise))
        return self.mean + self.std * eps.astype(self.mean.dtype)

    def mode(self) -> ms.Tensor:
        return self.mean

    def kl(self) -> ms.Tensor:
        """KL(q || N(0, I)) summed over each image's latent: shape (N,)."""
        if self.deterministic:
            return ops.zeros(self.mean.shape[:1], self.mean.dtype)
        return 0.5 * (self.mean * self.mean + self.var - 1.0 - self.logvar).sum(axis=(1, 2, 3))


# --------------------------------------------------------------------------------------------
# the image autoencoder


def _remap_key(key: str) -> str:
    """Map old diffusers attention names (`...attentions.0.query.weight`) to current ones."""
    parts = key.split(".")
    if len(parts) >= 2 and "attentions" in parts and parts[-2] in _OLD_ATTENTION_NAMES:
        return ".".join(parts[:-2] + [_OLD_ATTENTION_NAMES[parts[-2]], parts[-1]])
    return key


def normalize_vae_state_dict(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Accept both attention namings; squeeze 1x1-conv attention weights (LDM-era files) to the
    (out, in) matrices of the Dense layers."""
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        new_key = _remap_key(key)
        value = np.asarray(value)
        if ".attentions." in new_key and new_key.endswith(".weight") and value.ndim == 4:
            value = value[:, :, 0, 0]
        if new_key in out:
            raise CheckpointError(f"checkpoint holds both {key!r} and another key that maps to "
                                  f"{new_key!r}; keep one attention naming")
        out[new_key] = value
    return out


class AutoencoderKL(nn.Cell):
    """diffusers' AutoencoderKL: `encode(x)` -> posterior, `decode(z)` -> image.

    Images are (N, C, H, W) in [-1, 1]; latents are (N, latent_channels, H/f, W/f), unscaled
    (the scaling factor is the video wrapper's job, as in Open-Sora).
    """

    def __init__(self, config: AutoencoderKLConfig | Mapping[str, Any] | None = None,
                 attention_backend: str = "math", **kwargs: Any):
        super().__init__()
        if config is None:
            config = AutoencoderKLConfig(**kwargs)
        elif isinstance(config, Mapping):
            config = AutoencoderKLConfig.from_dict({**config, **kwargs})
        elif kwargs:
            raise TypeError("pass either a config or keyword arguments, not both")
        self.config = config
        self.encoder = Encoder(config, attention_backend)
        self.decoder = Decoder(config, attention_backend)
        lat = config.latent_channels
        self.quant_conv = conv2d(2 * lat, 2 * lat, 1, padding=0) if config.use_quant_conv else None
        self.post_quant_conv = (
            conv2d(lat, lat, 1, padding=0) if config.use_post_quant_conv else None
        )

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def encode_moments(self, x: ms.Tensor) -> ms.Tensor:
        """(N, C, H, W) -> (N, 2 * latent_channels, H/f, W/f): mean and log-variance stacked."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return moments

    def encode(self, x: ms.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.encode_moments(x))

    def decode(self, z: ms.Tensor) -> ms.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def construct(self, x: ms.Tensor, noise: ms.Tensor | None = None) -> ms.Tensor:
        """Reconstruct x through the posterior mean (or mean + std * noise when given)."""
        mean, logvar = split_moments(self.encode_moments(x))
        if noise is not None:
            mean = mean + ops.exp(0.5 * logvar) * noise
        return self.decode(mean)

    # ---- loading and saving in the diffusers layout

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, strict: bool = True,
                        attention_backend: str = "math") -> AutoencoderKL:
        """Build from `folder/config.json` and load the weights file next to it (strictly:
        any missing, unexpected or mis-shaped key raises one error listing them all)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"VAE folder not found: {folder} (pass a diffusers AutoencoderKL folder with "
                f"{CONFIG_NAME} and {WEIGHTS_NAME}, e.g. a download of stabilityai/sd-vae-ft-ema)"
            )
        model = cls(AutoencoderKLConfig.from_json(folder / CONFIG_NAME), attention_backend)
        model.load_weights(folder, strict=strict)
        return model

    def load_weights(self, source: str | os.PathLike | Mapping[str, np.ndarray],
                     strict: bool = True) -> LoadReport:
        state = source if isinstance(source, Mapping) else read_state_dict(source)
        try:
            return load_checkpoint(self, normalize_vae_state_dict(state), strict=strict)
        except CheckpointError as exc:
            where = "state dict" if isinstance(source, Mapping) else str(source)
            raise CheckpointError(f"loading VAE weights from {where}: {exc}") from None

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write config.json + diffusion_pytorch_model.safetensors (diffusers can load it)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_state_dict(self, folder / WEIGHTS_NAME, metadata={"format": "pt"})
        (folder / CONFIG_NAME).write_text(
            json.dumps(self.config.to_diffusers_dict(), indent=2) + "\n")
        return folder


# --------------------------------------------------------------------------------------------
# the video wrapper


class VideoAutoencoderKL(nn.Cell):
    """Open-Sora's `VideoAutoencoderKL`: a 2D VAE applied to every frame of a clip.

    `encode` returns latents already multiplied by `scaling_factor` (0.18215 for the SD VAE;
    `from_pretrained` reads it from the folder's config.json, diffusers' convention), shaped
    (B, latent_channels, T, H/f, W/f). Open-Sora draws a posterior *sample* here
    (`sample_posterior=True`, the default) rather than taking the mean; `sample_posterior=False`
    gives the deterministic mean, which is what a cache stores next to the std.
    `micro_batch_size` frames go through the VAE at once (None: all B*T frames together).
    """

    def __init__(self, vae: AutoencoderKL, micro_batch_size: int | None = None,
                 scaling_factor: float = SD_SCALING_FACTOR):
        super().__init__()
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be a positive integer or None, "
                             f"got {micro_batch_size}")
        self.module = vae
        self.micro_batch_size = micro_batch_size
        self.scaling_factor = scaling_factor
        self.out_channels = vae.config.latent_channels
        self.patch_size = (1, vae.downsample_factor, vae.downsample_factor)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, micro_batch_size: int | None = None,
                        scaling_factor: float | None = None,
                        attention_backend: str = "math") -> VideoAutoencoderKL:
        """`scaling_factor` None: the config's (1 / std of the VAE's latents, so the diffusion
        model sees unit-variance inputs; the SD VAE's is 0.18215)."""
        vae = AutoencoderKL.from_pretrained(folder, attention_backend=attention_backend)
        scale = vae.config.scaling_factor if scaling_factor is None else scaling_factor
        return cls(vae, micro_batch_size, scale)

    def get_latent_size(self, input_size: Sequence[int | None]) -> list[int | None]:
        """(T, H, W) of a clip -> (T, H/f, W/f) of its latent."""
        return [None if s is None else s // p for s, p in zip(input_size, self.patch_size)]

    # ---- frame folding

    @staticmethod
    def _to_frames(x: ms.Tensor) -> ms.Tensor:
        b, c, t, h, w = x.shape
        return x.transpose(0, 2, 1, 3, 4).reshape(b * t, c, h, w)

    @staticmethod
    def _to_video(frames: ms.Tensor, batch: int) -> ms.Tensor:
        n, c, h, w = frames.shape
        return frames.reshape(batch, n // batch, c, h, w).transpose(0, 2, 1, 3, 4)

    def _chunks(self, n: int) -> list[tuple[int, int]]:
        size = n if self.micro_batch_size is None else self.micro_batch_size
        return [(i, min(i + size, n)) for i in range(0, n, size)]

    @staticmethod
    def _check_video(x: ms.Tensor, what: str) -> None:
        if x.ndim != 5:
            raise ValueError(f"{what} expects a (B, C, T, H, W) tensor, got shape {x.shape}")

    # ---- encode / decode

    def encode_moments(self, x: ms.Tensor) -> tuple[ms.Tensor, ms.Tensor]:
        """Unscaled posterior mean and std, each (B, latent_channels, T, H/f, W/f)."""
        self._check_video(x, "encode")
        frames = self._to_frames(x)
        means, stds = [], []
        for start, stop in self._chunks(frames.shape[0]):
            mean, logvar = split_moments(self.module.encode_moments(frames[start:stop]))
            means.append(mean)
            stds.append(ops.exp(0.5 * logvar))
        mean = means[0] if len(means) == 1 else ops.cat(means, axis=0)
        std = stds[0] if len(stds) == 1 else ops.cat(stds, axis=0)
        return self._to_video(mean, x.shape[0]), self._to_video(std, x.shape[0])

    def encode(self, x: ms.Tensor, sample_posterior: bool = True,
               noise: np.random.Generator | int | ms.Tensor | None = None) -> ms.Tensor:
        """(B, C, T, H, W) in [-1, 1] -> scaled latents (B, latent_channels, T, H/f, W/f).

        With `sample_posterior` (Open-Sora's choice), the latent is mean + std * eps; eps is
        `noise` if it is a Tensor shaped like the latent, else drawn from a numpy Generator or
        seed (`None`: fresh entropy).
        """
        mean, std = self.encode_moments(x)
        if sample_posterior:
            eps = noise if isinstance(noise, ms.Tensor) else ms.Tensor(
                make_noise(mean.shape, noise))
            mean = mean + std * eps.astype(mean.dtype)
        return mean * self.scaling_factor

    def decode(self, z: ms.Tensor) -> ms.Tensor:
        """Scaled latents (B, latent_channels, T, h, w) -> video (B, C, T, h*f, w*f)."""
        self._check_video(z, "decode")
        frames = self._to_frames(z / self.scaling_factor)
        outs = [self.module.decode(frames[a:b]) for a, b in self._chunks(frames.shape[0])]
        out = outs[0] if len(outs) == 1 else ops.cat(outs, axis=0)
        return self._to_video(out, z.shape[0])

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        """Reconstruct a clip through the posterior mean."""
        return self.decode(self.encode(x, sample_posterior=False))


def psnr(reference: np.ndarray, estimate: np.ndarray, data_range: float = 2.0,
         axis: int | tuple[int, ...] | None = None) -> np.ndarray:
    """Peak signal-to-noise ratio in dB; default range 2 for [-1, 1] video."""
    diff = np.asarray(reference, np.float64) - np.asarray(estimate, np.float64)
    mse = np.mean(diff * diff, axis=axis)
    return 10.0 * np.log10(data_range**2 / np.maximum(mse, 1e-20))


__all__ = [
    "SD_SCALING_FACTOR",
    "AutoencoderKL",
    "AutoencoderKLConfig",
    "DiagonalGaussianDistribution",
    "VideoAutoencoderKL",
    "make_noise",
    "normalize_vae_state_dict",
    "psnr",
    "split_moments",
]
