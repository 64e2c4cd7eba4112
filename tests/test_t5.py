"""T5 encoder: parity with transformers' T5EncoderModel, loading HF folders as they are, the
float16 guard, the Open-Sora text-encoder interface, and the tiny preset's encoder."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from numerics import assert_f32_close, f32_magnitude

from opensora.checkpoint import CheckpointError, read_state_dict
from opensora.models.t5 import (
    T5Config,
    T5EncoderModel,
    init_t5_weights,
    relative_position_bucket,
)
from opensora.models.t5 import main as t5_main
from opensora.models.text_encoder import T5Embedder, T5Encoder, load_tokenizer
from opensora.presets import DATA_SAMPLES, get_preset

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
SHARDED = Path(__file__).parent / "fixtures" / "data" / "t5_sharded"
# Parity with transformers: a 2-3 layer encoder of width 24-32 (relative-position attention,
# gated-GELU, RMS norms) differs by ~1e2 float32 roundings of the hidden state's magnitude
PARITY_STEPS = 256
EPS16 = float(np.finfo(np.float16).eps)


def _run(model: T5EncoderModel, case: np.lib.npyio.NpzFile) -> np.ndarray:
    out = model(ms.Tensor(case["input_ids"]), ms.Tensor(case["attention_mask"]))
    return out.asnumpy()


def test_reference_parity_pynative_and_graph() -> None:
    case = np.load(REFERENCE / "t5_case.npz")
    model = T5EncoderModel.from_pretrained(REFERENCE / "t5_tiny")
    expected = case["last_hidden_state"]
    assert_f32_close(_run(model, case), expected, PARITY_STEPS)
    graph = ms.jit(model.construct)
    out = graph(ms.Tensor(case["input_ids"]), ms.Tensor(case["attention_mask"])).asnumpy()
    assert_f32_close(out, expected, PARITY_STEPS)
    # Open-Sora's encode() is the hidden state with a singleton "1" axis inserted
    np.testing.assert_allclose(case["encode.y"], expected[:, None], rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_sharded_folder_parity(layout: str) -> None:
    folder = SHARDED / layout
    index = "model.safetensors.index.json" if layout == "safetensors" else \
        "pytorch_model.bin.index.json"
    weight_map = json.loads((folder / index).read_text())["weight_map"]
    assert len(set(weight_map.values())) > 1, "fixture should be sharded"
    case = np.load(SHARDED / "case.npz")
    model = T5EncoderModel.from_pretrained(folder)
    assert_f32_close(_run(model, case), case["last_hidden_state"], PARITY_STEPS)


def test_parameter_names_are_hugging_face_keys() -> None:
    model = T5EncoderModel(T5Config.from_json(REFERENCE / "t5_tiny" / "config.json"))
    names = {name for name, _ in model.parameters_and_names()}
    assert names == set(read_state_dict(REFERENCE / "t5_tiny"))
    assert "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" not in names


def test_tied_embedding_alias_and_decoder_keys() -> None:
    state = read_state_dict(REFERENCE / "t5_tiny")
    state["encoder.embed_tokens.weight"] = state.pop("shared.weight")
    state["decoder.block.0.layer.0.SelfAttention.q.weight"] = np.zeros((4, 4), np.float32)
    state["lm_head.weight"] = np.zeros((4, 4), np.float32)
    model = T5EncoderModel(T5Config.from_json(REFERENCE / "t5_tiny" / "config.json"))
    model.load_state_dict(state)
    case = np.load(REFERENCE / "t5_case.npz")
    assert_f32_close(_run(model, case), case["last_hidden_state"], PARITY_STEPS)


def test_mismatched_config_is_reported(tmp_path: Path) -> None:
    config = json.loads((REFERENCE / "t5_tiny" / "config.json").read_text())
    config["d_ff"] += 8
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(
        (REFERENCE / "t5_tiny" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="wi_0.weight"):
        T5EncoderModel.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        T5EncoderModel.from_pretrained(tmp_path / "missing")


def test_relative_position_buckets() -> None:
    # 32 buckets, 128 max distance: 16 per direction, offsets < 8 exact, then log-spaced;
    # -16 sits exactly on a bucket boundary (log2 ratio), where float rounding matters
    offsets = np.array([0, -1, 1, -7, -8, 7, 8, -16, -127, -128, -500, 500])
    expected = [0, 1, 17, 7, 8, 23, 24, 10, 15, 15, 15, 31]
    assert relative_position_bucket(offsets, 32, 128).tolist() == expected


def test_position_bias_lookup_covers_long_sequences() -> None:
    config = T5Config(vocab_size=8, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16)
    model = T5EncoderModel(config)
    model.load_state_dict(init_t5_weights(config, seed=3))
    attention = model.encoder.block[0].layer[0].SelfAttention
    length = 50  # beyond the lookup table's +-max_distance
    bias = attention.compute_bias(length).asnumpy()
    positions = np.arange(length)
    buckets = relative_position_bucket(positions[None, :] - positions[:, None], 8, 16)
    table = attention.relative_attention_bias.weight.asnumpy()
    np.testing.assert_array_equal(bias[0], table[buckets].transpose(2, 0, 1))


def test_float16_guard_keeps_overflowing_activations_finite() -> None:
    config = T5Config(vocab_size=16, d_model=8, d_kv=4, d_ff=16, num_layers=2, num_heads=2)
    state = init_t5_weights(config, seed=0)
    for key in state:
        if key.endswith("wo.weight"):
            state[key] = state[key] * 1e5  # feed-forward output far beyond float16's 65504
    ids = ms.Tensor(np.array([[5, 6, 7, 1]], np.int32))
    mask = ms.Tensor(np.ones((1, 4), np.int32))
    half = T5EncoderModel(config, dtype=ms.float16)
    half.load_state_dict(state)
    assert half.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == ms.float32
    out = half(ids, mask).asnumpy()
    assert out.dtype == np.float16
    assert np.isfinite(out).all()


def test_float16_close_to_float32() -> None:
    case = np.load(REFERENCE / "t5_case.npz")
    half = T5EncoderModel.from_pretrained(REFERENCE / "t5_tiny", dtype=ms.float16)
    out = _run(half, case).astype(np.float32)
    expected = case["last_hidden_state"]
    # float16 activations: a few float16 roundings (eps 2**-10) of the hidden state's magnitude
    np.testing.assert_allclose(out, expected, rtol=0, atol=8 * EPS16 * f32_magnitude(expected))


# ---- tiny preset and the Open-Sora interface -------------------------------------------------

TINY = get_preset("tiny")


@pytest.fixture(scope="module")
def tiny_encoder() -> T5Encoder:
    return T5Encoder(TINY.t5_path, TINY.tokenizer_path, model_max_length=TINY.model_max_length)


def _captions() -> list[str]:
    with open(DATA_SAMPLES / "video_caption.csv", newline="") as handle:
        return sorted({row["caption"] for row in csv.DictReader(handle)})


def test_tiny_t5_is_reproducible_and_fits_tokenizer(tmp_path: Path) -> None:
    tokenizer = load_tokenizer(TINY.tokenizer_path)
    config = T5Config.from_json(TINY.t5_path / "config.json")
    assert config.vocab_size == len(tokenizer)
    assert config.d_model == TINY.model["caption_channels"]
    t5_main(["--make-tiny", str(tmp_path), "--tokenizer", str(TINY.tokenizer_path)])
    fresh, committed = read_state_dict(tmp_path), read_state_dict(TINY.t5_path)
    assert fresh.keys() == committed.keys()
    for key in fresh:
        np.testing.assert_array_equal(fresh[key], committed[key])


def test_encode_shapes_mask_and_truncation(tiny_encoder: T5Encoder) -> None:
    length = TINY.model_max_length
    short, long = "a red circle", " ".join(["a red circle moving left"] * 10)
    with pytest.warns(UserWarning, match=f"has [0-9]+ tokens; .* keeps the first {length}"):
        out = tiny_encoder.encode([short, long])
    assert tuple(out["y"].shape) == (2, 1, length, tiny_encoder.output_dim)
    mask = out["mask"].asnumpy()
    assert mask.shape == (2, length)
    with pytest.warns(UserWarning, match="keeps the first"):
        ids, _ = tiny_encoder.t5.tokenize([short, long])
    assert mask[0].sum() == 4 and ids[0, 3] == tiny_encoder.t5.tokenizer.eos_token_id
    assert (ids[0, 4:] == tiny_encoder.t5.tokenizer.pad_token_id).all()
    assert mask[1].sum() == length  # truncated to model_max_length, eos kept last
    assert ids[1, -1] == tiny_encoder.t5.tokenizer.eos_token_id
    alone = tiny_encoder.encode(short)["y"].asnumpy()
    # the same caption alone and in a padded batch of two: the same model, another batch shape
    assert_f32_close(alone[0], out["y"].asnumpy()[0], 64)


def test_world_captions_fit_without_a_warning(tiny_encoder: T5Encoder) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_encoder.t5.tokenize(_captions())


def test_captions_remain_distinguishable(tiny_encoder: T5Encoder) -> None:
    captions = _captions()
    out = tiny_encoder.encode(captions + captions[:1])
    y, mask = out["y"].asnumpy()[:, 0], out["mask"].asnumpy()[..., None]
    pooled = (y * mask).sum(1) / mask.sum(1)
    pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
    similarity = pooled @ pooled.T
    n = len(captions)
    different = similarity[:n, :n][~np.eye(n, dtype=bool)]
    assert similarity[0, n] > 0.9999  # the same caption twice
    assert different.max() < 0.99, f"captions collapse: max cosine {different.max():.4f}"


def test_null_caption_comes_from_the_model(tiny_encoder: T5Encoder) -> None:
    with pytest.raises(RuntimeError, match="y_embedder"):
        tiny_encoder.null(2)

    class CaptionEmbedder:
        y_embedding = ms.Parameter(ms.Tensor(
            np.random.default_rng(0).standard_normal((TINY.model_max_length, 64), np.float32)))

    tiny_encoder.y_embedder = CaptionEmbedder()
    try:
        null = tiny_encoder.null(3).asnumpy()
    finally:
        tiny_encoder.y_embedder = None
    assert null.shape == (3, 1, TINY.model_max_length, 64)
    for row in null:
        np.testing.assert_array_equal(row[0], CaptionEmbedder.y_embedding.asnumpy())


def test_embedder_rejects_bad_input(tmp_path: Path) -> None:
    embedder = T5Embedder.from_pretrained(TINY.t5_path, TINY.tokenizer_path, model_max_length=8)
    with pytest.raises(ValueError, match="no captions"):
        embedder.tokenize([])
    with pytest.raises(TypeError, match="caption 1"):
        embedder.tokenize(["fine", None])  # type: ignore[list-item]
    with pytest.raises(FileNotFoundError, match="tokenizer folder"):
        load_tokenizer(tmp_path / "nope")
    small = T5EncoderModel(T5Config(vocab_size=4, d_model=8, d_kv=4, d_ff=8, num_layers=1,
                                     num_heads=2))
    with pytest.raises(ValueError, match="does not belong"):
        T5Embedder(small, embedder.tokenizer)
