"""The T5 v1.1 encoder that turns captions into the token states Open-Sora attends to.

Open-Sora conditions on the last hidden state of `DeepFloyd/t5-v1_1-xxl`'s encoder. This is the
same network in MindSpore: relative position buckets (one learned bias per head, shared by all
blocks), RMS layer norm without mean or bias, a gated-GELU feed-forward, and no bias anywhere.
Cell attributes carry Hugging Face's module names, so `parameters_and_names()` yields exactly the
keys of `transformers.T5EncoderModel.state_dict()` (`shared.weight`,
`encoder.block.0.layer.0.SelfAttention.q.weight`, ..., `encoder.final_layer_norm.weight`) and a
downloaded T5 folder loads as it is, sharded or not.

Make the tiny preset's encoder with `make tiny-t5` (`python -m opensora.models.t5 --make-tiny`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from opensora.checkpoint import load_checkpoint, read_state_dict, save_state_dict
from opensora.models.ops import gelu_tanh
from opensora.runtime import configure

# T5 in float16 overflows: activations of the xxl feed-forward exceed 65504. Hugging Face keeps
# the `wo` projections in float32 and clamps the residual stream just below the float16 maximum;
# we do the same (see `T5Block.construct` and `T5DenseGatedActDense`).
_FP16_CLAMP = float(np.finfo(np.float16).max) - 1000.0


@dataclass
class T5Config:
    """The subset of Hugging Face's `T5Config` keys that shape the encoder."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 8
    num_heads: int = 6
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    pad_token_id: int = 0
    eos_token_id: int = 1

    def __post_init__(self) -> None:
        if self.feed_forward_proj not in ("gated-gelu", "relu"):
            raise ValueError(
                f"feed_forward_proj={self.feed_forward_proj!r} is not supported; T5 v1.1 uses "
                "'gated-gelu' and the original T5 'relu'"
            )

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> T5Config:
        """Read a Hugging Face config dict, ignoring keys the encoder does not use."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in known})

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> T5Config:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: a T5 folder needs its config.json")
        return cls.from_dict(json.loads(path.read_text()))

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that `transformers.T5EncoderModel.from_pretrained` also accepts."""
        gated = self.feed_forward_proj.startswith("gated-")
        return {
            "architectures": ["T5EncoderModel"],
            "model_type": "t5",
            **asdict(self),
            "dense_act_fn": "gelu_new" if gated else "relu",
            "is_gated_act": gated,
            "num_decoder_layers": self.num_layers,
            "dropout_rate": 0.0,
            "initializer_factor": 1.0,
            "is_encoder_decoder": False,
            "tie_word_embeddings": False,
            "use_cache": False,
            "decoder_start_token_id": self.pad_token_id,
        }


class Embedding(nn.Cell):
    """Token lookup with a `weight` parameter (MindSpore's own names it `embedding_table`)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: ms.Type = ms.float32):
        super().__init__()
        self.weight = ms.Parameter(
            ms.Tensor(np.zeros((num_embeddings, embedding_dim), np.float32), dtype), name="weight"
        )

    def construct(self, ids: ms.Tensor) -> ms.Tensor:
        return ops.gather(self.weight, ids, 0)


class T5LayerNorm(nn.Cell):
    """RMS norm: scale only, no mean subtraction, no bias; statistics in float32 always."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: ms.Type = ms.float32):
        super().__init__()
        self.weight = ms.Parameter(ms.Tensor(np.ones(hidden_size, np.float32), dtype),
                                   name="weight")
        self.eps = eps

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        x32 = x.astype(ms.float32)
        variance = (x32 * x32).mean(-1, keep_dims=True)
        normed = x32 * ops.rsqrt(variance + self.eps)
        return self.weight * normed.astype(self.weight.dtype)


def _linear(in_features: int, out_features: int, dtype: ms.Type) -> nn.Dense:
    return nn.Dense(in_features, out_features, has_bias=False, dtype=dtype)


def relative_position_bucket(relative_position: np.ndarray, num_buckets: int,
                             max_distance: int) -> np.ndarray:
    """Bidirectional T5 buckets: half per direction, exact up to num_buckets/4, then log-spaced.

    Offsets within `max_exact` each get their own bucket; larger offsets share buckets whose width
    grows logarithmically up to `max_distance`, beyond which everything lands in the last bucket.
    Computed in float32 numpy like the reference (an offset of exactly 2x, 4x... `max_exact`
    sits on a bucket boundary, so the log must round the same way; MindSpore's CPU log does not).
    """
    relative_position = np.asarray(relative_position, dtype=np.int64)
    num_buckets //= 2
    buckets = (relative_position > 0).astype(np.int64) * num_buckets
    distance = np.abs(relative_position)
    max_exact = num_buckets // 2
    with np.errstate(divide="ignore"):  # log(0) happens only where `is_small` picks `distance`
        ratio = np.log(distance.astype(np.float32) / np.float32(max_exact))
    scaled = ratio / np.float32(math.log(max_distance / max_exact)) * np.float32(
        num_buckets - max_exact)
    large = max_exact + np.nan_to_num(scaled, neginf=0.0).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return (buckets + np.where(distance < max_exact, distance, large)).astype(np.int32)


class T5Attention(nn.Cell):
    """Unscaled multi-head self-attention (T5 folds 1/sqrt(d) into the q initialisation)."""

    def __init__(self, config: T5Config, has_relative_attention_bias: bool,
                 dtype: ms.Type = ms.float32):
        super().__init__()
        self.n_heads = config.num_heads
        self.d_kv = config.d_kv
        inner = config.num_heads * config.d_kv
        self.q = _linear(config.d_model, inner, dtype)
        self.k = _linear(config.d_model, inner, dtype)
        self.v = _linear(config.d_model, inner, dtype)
        self.o = _linear(inner, config.d_model, dtype)
        self.has_relative_attention_bias = has_relative_attention_bias
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        if has_relative_attention_bias:
            self.relative_attention_bias = Embedding(self.num_buckets, self.n_heads, dtype)
            # buckets depend only on the offset, and are constant beyond +-max_distance: one
            # small lookup table serves every sequence length, in PyNative and graph mode alike
            self.max_offset = max(self.max_distance, self.num_buckets)
            offsets = np.arange(-self.max_offset, self.max_offset + 1)
            self.bucket_table = ms.Tensor(
                relative_position_bucket(offsets, self.num_buckets, self.max_distance))

    def compute_bias(self, length: int) -> ms.Tensor:
        """(1, heads, L, L) learned bias indexed by the bucket of (key pos - query pos)."""
        positions = ops.arange(length, dtype=ms.int32)
        relative = positions[None, :] - positions[:, None]
        relative = ops.clamp(relative, -self.max_offset, self.max_offset) + self.max_offset
        buckets = ops.gather(self.bucket_table, relative, 0)
        values = self.relative_attention_bias(buckets)  # (L, L, heads)
        return values.transpose(2, 0, 1)[None].astype(ms.float32)

    def _heads(self, x: ms.Tensor) -> ms.Tensor:
        batch, length, _ = x.shape
        return x.reshape(batch, length, self.n_heads, self.d_kv).transpose(0, 2, 1, 3)

    def construct(self, hidden: ms.Tensor, position_bias: ms.Tensor) -> ms.Tensor:
        batch, length, _ = hidden.shape
        q, k, v = (self._heads(proj(hidden)) for proj in (self.q, self.k, self.v))
        scores = ops.matmul(q, k.transpose(0, 1, 3, 2)).astype(ms.float32) + position_bias
        weights = ops.softmax(scores, -1).astype(v.dtype)
        context = ops.matmul(weights, v).transpose(0, 2, 1, 3)
        return self.o(context.reshape(batch, length, self.n_heads * self.d_kv))


class T5LayerSelfAttention(nn.Cell):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool,
                 dtype: ms.Type = ms.float32):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias, dtype)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon, dtype)

    def construct(self, hidden: ms.Tensor, position_bias: ms.Tensor) -> ms.Tensor:
        return hidden + self.SelfAttention(self.layer_norm(hidden), position_bias)


class T5DenseGatedActDense(nn.Cell):
    """gelu_new(wi_0 x) * (wi_1 x), then wo. `wo` may be kept in float32 (the fp16 guard)."""

    def __init__(self, config: T5Config, dtype: ms.Type = ms.float32,
                 wo_dtype: ms.Type = ms.float32):
        super().__init__()
        self.wi_0 = _linear(config.d_model, config.d_ff, dtype)
        self.wi_1 = _linear(config.d_model, config.d_ff, dtype)
        self.wo = _linear(config.d_ff, config.d_model, wo_dtype)
        self.out_dtype = dtype

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        gated = gelu_tanh(self.wi_0(x)) * self.wi_1(x)
        return self.wo(gated.astype(self.wo.weight.dtype)).astype(self.out_dtype)


class T5DenseActDense(nn.Cell):
    """The original T5 feed-forward: relu(wi x), then wo."""

    def __init__(self, config: T5Config, dtype: ms.Type = ms.float32,
                 wo_dtype: ms.Type = ms.float32):
        super().__init__()
        self.wi = _linear(config.d_model, config.d_ff, dtype)
        self.wo = _linear(config.d_ff, config.d_model, wo_dtype)
        self.out_dtype = dtype

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        hidden = ops.relu(self.wi(x))
        return self.wo(hidden.astype(self.wo.weight.dtype)).astype(self.out_dtype)


class T5LayerFF(nn.Cell):
    def __init__(self, config: T5Config, dtype: ms.Type = ms.float32,
                 wo_dtype: ms.Type = ms.float32):
        super().__init__()
        gated = config.feed_forward_proj == "gated-gelu"
        self.DenseReluDense = (T5DenseGatedActDense if gated else T5DenseActDense)(
            config, dtype, wo_dtype)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon, dtype)

    def construct(self, hidden: ms.Tensor) -> ms.Tensor:
        return hidden + self.DenseReluDense(self.layer_norm(hidden))


class T5Block(nn.Cell):
    """Pre-norm self-attention then feed-forward, with the float16 overflow clamp."""

    def __init__(self, config: T5Config, has_relative_attention_bias: bool,
                 dtype: ms.Type = ms.float32, wo_dtype: ms.Type = ms.float32):
        super().__init__()
        self.layer = nn.CellList([
            T5LayerSelfAttention(config, has_relative_attention_bias, dtype),
            T5LayerFF(config, dtype, wo_dtype),
        ])
        self.clamp = dtype == ms.float16

    def _guard(self, hidden: ms.Tensor) -> ms.Tensor:
        if self.clamp:
            return ops.clamp(hidden, -_FP16_CLAMP, _FP16_CLAMP)
        return hidden

    def construct(self, hidden: ms.Tensor, position_bias: ms.Tensor) -> ms.Tensor:
        hidden = self._guard(self.layer[0](hidden, position_bias))
        return self._guard(self.layer[1](hidden))


class T5Stack(nn.Cell):
    """The encoder stack. Block 0 owns the relative position bias; every block reuses it."""

    def __init__(self, config: T5Config, dtype: ms.Type = ms.float32,
                 wo_dtype: ms.Type = ms.float32):
        super().__init__()
        self.block = nn.CellList([
            T5Block(config, has_relative_attention_bias=(i == 0), dtype=dtype, wo_dtype=wo_dtype)
            for i in range(config.num_layers)
        ])
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon, dtype)

    def construct(self, embeds: ms.Tensor, attention_mask: ms.Tensor) -> ms.Tensor:
        length = embeds.shape[1]
        position_bias = self.block[0].layer[0].SelfAttention.compute_bias(length)
        # padded keys get a large negative score; float32 min keeps softmax finite for all-pad rows
        mask = attention_mask.astype(ms.float32)[:, None, None, :]
        position_bias = position_bias + (1.0 - mask) * float(np.finfo(np.float32).min)
        hidden = embeds
        for block in self.block:
            hidden = block(hidden, position_bias)
        return self.final_layer_norm(hidden)


class T5EncoderModel(nn.Cell):
    """`transformers.T5EncoderModel` in MindSpore: token ids + mask -> last hidden state.

    dtype: float32 everywhere (required on CPU); bfloat16 or float16 where the device supports
    them. In float16, T5 activations overflow (the xxl feed-forward exceeds 65504), so as in
    Hugging Face the `wo` projections stay float32 and the residual stream is clamped to
    +-(65504 - 1000) after each sub-layer; norms and softmax always compute in float32.
    """

    def __init__(self, config: T5Config, dtype: ms.Type = ms.float32):
        super().__init__()
        self.config = config
        self.dtype = dtype
        wo_dtype = ms.float32 if dtype == ms.float16 else dtype
        self.shared = Embedding(config.vocab_size, config.d_model, dtype)
        self.encoder = T5Stack(config, dtype, wo_dtype)

    def construct(self, input_ids: ms.Tensor, attention_mask: ms.Tensor | None = None
                  ) -> ms.Tensor:
        if attention_mask is None:
            attention_mask = ops.ones_like(input_ids)
        return self.encoder(self.shared(input_ids), attention_mask)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, dtype: ms.Type = ms.float32,
                        strict: bool = True) -> T5EncoderModel:
        """Load a Hugging Face T5 folder as it is: config.json plus model.safetensors,
        pytorch_model.bin, or shards with their `*.index.json` (e.g. DeepFloyd/t5-v1_1-xxl)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"T5 folder {folder} not found; pass a folder with config.json and weights "
                "(e.g. a local copy of DeepFloyd/t5-v1_1-xxl)"
            )
        _check_dtype(dtype)
        model = cls(T5Config.from_json(folder / "config.json"), dtype=dtype)
        model.load_state_dict(read_state_dict(folder), strict=strict)
        model.set_train(False)
        return model

    def load_state_dict(self, state: Mapping[str, np.ndarray], strict: bool = True) -> None:
        """Load HF keys, accepting the tied `encoder.embed_tokens.weight` for `shared.weight`
        and dropping the decoder / LM head of a full T5ForConditionalGeneration checkpoint."""
        state = dict(state)
        alias = state.pop("encoder.embed_tokens.weight", None)
        if "shared.weight" not in state and alias is not None:
            state["shared.weight"] = alias
        state = {k: v for k, v in state.items()
                 if not (k.startswith("decoder.") or k.startswith("lm_head."))}
        load_checkpoint(self, state, strict=strict)

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write config.json + model.safetensors in the Hugging Face layout."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config.to_hf_dict(), indent=2) + "\n")
        state = {name: p.asnumpy().astype(np.float32) for name, p in self.parameters_and_names()}
        save_state_dict(state, folder / "model.safetensors")
        return folder


def _check_dtype(dtype: ms.Type) -> None:
    if dtype not in (ms.float32, ms.float16, ms.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    if dtype == ms.bfloat16 and ms.get_context("device_target") == "CPU":
        raise ValueError("bfloat16 is not supported on CPU; use dtype=mindspore.float32")


def init_t5_weights(config: T5Config, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights with Hugging Face's T5 initialisation scales (so activations stay O(1))."""
    rng = np.random.default_rng(seed)
    d, inner, ff = config.d_model, config.num_heads * config.d_kv, config.d_ff

    def normal(std: float, *shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    state = {"shared.weight": normal(1.0, config.vocab_size, d),
             "encoder.final_layer_norm.weight": np.ones(d, np.float32)}
    for i in range(config.num_layers):
        prefix = f"encoder.block.{i}.layer"
        attn = f"{prefix}.0.SelfAttention"
        state[f"{attn}.q.weight"] = normal((d * config.d_kv) ** -0.5, inner, d)
        state[f"{attn}.k.weight"] = normal(d ** -0.5, inner, d)
        state[f"{attn}.v.weight"] = normal(d ** -0.5, inner, d)
        state[f"{attn}.o.weight"] = normal(inner ** -0.5, d, inner)
        if i == 0:
            state[f"{attn}.relative_attention_bias.weight"] = normal(
                d ** -0.5, config.relative_attention_num_buckets, config.num_heads)
        state[f"{prefix}.0.layer_norm.weight"] = np.ones(d, np.float32)
        dense = f"{prefix}.1.DenseReluDense"
        if config.feed_forward_proj == "gated-gelu":
            state[f"{dense}.wi_0.weight"] = normal(d ** -0.5, ff, d)
            state[f"{dense}.wi_1.weight"] = normal(d ** -0.5, ff, d)
        else:
            state[f"{dense}.wi.weight"] = normal(d ** -0.5, ff, d)
        state[f"{dense}.wo.weight"] = normal(ff ** -0.5, d, ff)
        state[f"{prefix}.1.layer_norm.weight"] = np.ones(d, np.float32)
    return state


TINY_T5 = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
               relative_attention_num_buckets=32, relative_attention_max_distance=128)


def make_tiny_t5(out: str | os.PathLike, vocab_size: int, seed: int = 0,
                 **overrides: Any) -> Path:
    """Write the tiny preset's frozen text encoder: a seeded random T5 v1.1 in the HF layout.

    A frozen encoder needs no training to be useful for conditioning: random projections of
    different token sequences stay different (the chapter 2 notebook and tests show it).
    """
    config = T5Config(vocab_size=vocab_size, **{**TINY_T5, **overrides})
    model = T5EncoderModel(config)
    model.load_state_dict(init_t5_weights(config, seed))
    return model.save_pretrained(out)


def _vocab_size_of(tokenizer_path: str | os.PathLike) -> int:
    # transformers is imported on use: configure() must quiet its import-time advisory first
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(str(tokenizer_path), local_files_only=True))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--make-tiny", metavar="OUT", required=True,
                        help="write a seeded random tiny T5 folder here")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--vocab-size", type=int, help="embedding rows")
    size.add_argument("--tokenizer", help="take the vocabulary size from this tokenizer folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    configure()
    vocab = args.vocab_size if args.vocab_size else _vocab_size_of(args.tokenizer)
    print(f"wrote {make_tiny_t5(args.make_tiny, vocab, seed=args.seed)} (vocab {vocab})")


__all__ = ["T5Config", "T5EncoderModel", "init_t5_weights", "make_tiny_t5",
           "relative_position_bucket"]

if __name__ == "__main__":
    main()
