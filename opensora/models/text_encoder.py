"""Captions in, conditioning out: the tokenizer + T5 encoder pair Open-Sora's models consume.

`T5Embedder` tokenizes (pad to `model_max_length`, truncate beyond it) and encodes;
`T5Encoder` is Open-Sora's text-encoder interface on top of it:

- `encode(texts)` -> dict(y=(B, 1, L, C) float, mask=(B, L) int), the keyword arguments the
  diffusion transformer's forward takes;
- `null(n)` -> (n, 1, L, C), the *learned* null caption for classifier-free guidance. It belongs
  to the diffusion model's caption embedder (`y_embedder.y_embedding`, trained by dropping
  captions with probability `class_dropout_prob`), not to T5: the pipeline attaches it with
  `text_encoder.y_embedder = model.y_embedder`, exactly as Open-Sora's scripts do.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mindspore as ms
import numpy as np
from mindspore import ops

from opensora.models.t5 import T5EncoderModel


def load_tokenizer(path: str | os.PathLike) -> Any:
    """A tokenizer from a local folder only; a missing folder is an error, never a download."""
    # transformers is imported on use: configure() must quiet its import-time advisory first
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"tokenizer folder {path} not found; pass a local folder with tokenizer files "
            "(e.g. data_samples/tokenizer or the T5 checkpoint folder)"
        )
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _check_texts(texts: Sequence[str] | str) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise ValueError("no captions given: pass a non-empty list of strings")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"caption {i} is {type(text).__name__}, expected str: {text!r}")
    return texts


class T5Embedder:
    """Tokenizer + frozen T5 encoder: token ids and mask -> last hidden state (B, L, C)."""

    def __init__(self, model: T5EncoderModel, tokenizer: Any, model_max_length: int = 120):
        if model_max_length < 1:
            raise ValueError(f"model_max_length must be >= 1, got {model_max_length}")
        vocab = model.config.vocab_size
        if len(tokenizer) > vocab:
            raise ValueError(
                f"tokenizer has {len(tokenizer)} tokens but the T5 embedding has {vocab} rows; "
                "the tokenizer does not belong to this T5 checkpoint"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.model_max_length = model_max_length

    @classmethod
    def from_pretrained(cls, t5_path: str | os.PathLike,
                        tokenizer_path: str | os.PathLike | None = None,
                        model_max_length: int = 120, dtype: ms.Type = ms.float32) -> T5Embedder:
        """The tokenizer defaults to the T5 folder itself (published T5 folders carry both)."""
        tokenizer = load_tokenizer(tokenizer_path if tokenizer_path is not None else t5_path)
        model = T5EncoderModel.from_pretrained(t5_path, dtype=dtype)
        return cls(model, tokenizer, model_max_length)

    def tokenize(self, texts: Sequence[str] | str) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), both (B, model_max_length) int32; 1 = real token.

        A text longer than model_max_length tokens is cut there, as Open-Sora does, with a
        warning: the words beyond it never reach the model."""
        texts = _check_texts(texts)
        lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=True)["input_ids"]]
        for text, length in zip(texts, lengths):
            if length > self.model_max_length:
                warnings.warn(f"prompt {text[:48]!r}... has {length} tokens; the text encoder "
                              f"keeps the first {self.model_max_length} (model_max_length)",
                              stacklevel=3)
        tokens = self.tokenizer(
            texts, max_length=self.model_max_length, padding="max_length",
            truncation=True, return_attention_mask=True, add_special_tokens=True,
        )
        ids = np.asarray(tokens["input_ids"], dtype=np.int32)
        mask = np.asarray(tokens["attention_mask"], dtype=np.int32)
        return ids, mask

    def get_text_embeddings(self, texts: Sequence[str] | str) -> tuple[ms.Tensor, ms.Tensor]:
        ids, mask = self.tokenize(texts)
        ids_t, mask_t = ms.Tensor(ids), ms.Tensor(mask)
        return ops.stop_gradient(self.model(ids_t, mask_t)), mask_t


class T5Encoder:
    """Open-Sora's text-encoder interface (`encode`, `null`, `output_dim`, `model_max_length`)."""

    def __init__(self, from_pretrained: str | os.PathLike,
                 tokenizer_path: str | os.PathLike | None = None,
                 model_max_length: int = 120, dtype: ms.Type = ms.float32):
        self.t5 = T5Embedder.from_pretrained(from_pretrained, tokenizer_path, model_max_length,
                                             dtype)
        self.model_max_length = model_max_length
        self.output_dim = self.t5.model.config.d_model
        self.dtype = dtype
        self.y_embedder: Any = None  # set to the diffusion model's CaptionEmbedder

    def encode(self, texts: Sequence[str] | str) -> dict[str, ms.Tensor]:
        """dict(y=(B, 1, L, C), mask=(B, L)): the caption arguments of STDiT / STDiT2."""
        hidden, mask = self.t5.get_text_embeddings(texts)
        return dict(y=hidden[:, None], mask=mask)

    def null(self, n: int) -> ms.Tensor:
        """n copies of the model's learned null caption, (n, 1, L, C), for the CFG branch."""
        if self.y_embedder is None or not hasattr(self.y_embedder, "y_embedding"):
            raise RuntimeError(
                "the null caption is learned by the diffusion model: attach its caption embedder "
                "first with `text_encoder.y_embedder = model.y_embedder`"
            )
        table = self.y_embedder.y_embedding
        if not isinstance(table, ms.Tensor):
            table = ms.Tensor(np.asarray(table))
        if tuple(table.shape) != (self.model_max_length, self.output_dim):
            raise ValueError(
                f"y_embedding has shape {tuple(table.shape)} but this text encoder produces "
                f"({self.model_max_length}, {self.output_dim}); the model's model_max_length / "
                "caption_channels and the text encoder's disagree"
            )
        return ops.tile(table[None, None], (n, 1, 1, 1))
