"""STDiT building blocks against independent numpy formulas and the properties they promise."""

from __future__ import annotations

from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from numerics import EPS32, assert_f32_close

from opensora.models.layers import (
    Attention,
    CaptionEmbedder,
    LayerNorm,
    MultiHeadCrossAttention,
    PatchEmbed3D,
    PositionEmbedding2D,
    RotaryEmbedding,
    SizeEmbedder,
    T2IFinalLayer,
    TimestepEmbedder,
    get_1d_sincos_pos_embed,
    get_2d_sincos_pos_embed,
    pair_rotation,
    rotate_pairs,
    sincos_1d,
)

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
RNG = np.random.default_rng(0)


def _t(a) -> ms.Tensor:
    return ms.Tensor(np.asarray(a, dtype=np.float32))


def _max_position(grid: tuple[int, ...], scale: float, base_size: int | None) -> float:
    """The largest sin-cos angle of a 2D table (frequencies <= 1): float32 sin / cos of an angle
    A round like A * eps, so tables of positions up to A compare at that scale."""
    return max((n - 1) / scale * (base_size / n if base_size else 1.0) for n in grid)


# ---------------------------------------------------------------------------------------------
# position embeddings


def test_2d_pos_embed_matches_open_sora_reference_case() -> None:
    case = np.load(REFERENCE / "stdit2_case_plain.npz")
    # the case: 128 x 128 video, input_sq_size 128, 8 x 8 patch grid
    got = PositionEmbedding2D(96)(8, 8, 1.0, 8).asnumpy()
    assert_f32_close(got, case["pos_emb"], 8, scale=_max_position((8, 8), 1.0, 8))


@pytest.mark.parametrize(("grid", "scale", "base_size"), [((3, 5), 1.0, None), ((4, 6), 2.5, 5),
                                                          ((7, 7), 0.5, 7)])
def test_2d_pos_embed_ops_equal_numpy(grid, scale, base_size) -> None:
    expected = get_2d_sincos_pos_embed(32, grid, scale=scale, base_size=base_size)
    got = PositionEmbedding2D(32)(grid[0], grid[1], _t(scale), base_size).asnumpy()[0]
    assert_f32_close(got, expected, 8, scale=_max_position(grid, scale, base_size))


def test_2d_pos_embed_layout() -> None:
    """First half of the channels encodes the column, second half the row; sin before cos."""
    emb = get_2d_sincos_pos_embed(8, (2, 3))  # rows = 2, cols = 3
    cols = np.tile(np.arange(3), 2)
    rows = np.repeat(np.arange(2), 3)
    np.testing.assert_allclose(emb[:, 0], np.sin(cols), atol=1e-7)
    np.testing.assert_allclose(emb[:, 2], np.cos(cols), atol=1e-7)
    np.testing.assert_allclose(emb[:, 4], np.sin(rows), atol=1e-7)
    # base_size stretches any grid to span the same range of positions
    stretched = get_2d_sincos_pos_embed(8, (4, 4), base_size=2)
    np.testing.assert_allclose(stretched[3, 0], np.sin(1.5), atol=1e-7)


def test_1d_temporal_embed() -> None:
    emb = get_1d_sincos_pos_embed(6, 4, scale=2.0)
    omega = 1.0 / 10000 ** (np.arange(3) / 3)
    pos = np.arange(4)[:, None] / 2.0
    np.testing.assert_allclose(emb, np.concatenate([np.sin(pos * omega), np.cos(pos * omega)], 1))
    assert_f32_close(sincos_1d(4, 6, 2.0).asnumpy()[0], emb, 8, scale=float(pos.max()))


# ---------------------------------------------------------------------------------------------
# rotary embedding


def _numpy_rope(x: np.ndarray, theta: float = 10000.0) -> np.ndarray:
    """rotary_embedding_torch's rotate_queries_or_keys, interleaved pairs, positions 0..N-1."""
    dim, seq = x.shape[-1], x.shape[-2]
    freqs = 1.0 / theta ** (np.arange(0, dim, 2) / dim)
    angles = np.repeat(np.arange(seq)[:, None] * freqs[None], 2, axis=-1)
    pairs = x.reshape(*x.shape[:-1], dim // 2, 2)
    rotated = np.stack([-pairs[..., 1], pairs[..., 0]], -1).reshape(x.shape)
    return x * np.cos(angles) + rotated * np.sin(angles)


def test_rope_matches_rotary_embedding_torch_formula() -> None:
    x = RNG.standard_normal((2, 3, 7, 12)).astype(np.float32)
    rope = RotaryEmbedding(12)
    assert rope.freqs.shape == (6,) and not rope.freqs.requires_grad
    # rotation angles up to N - 1 = 6 rad: float32 cos / sin of an angle A round like A * eps
    assert_f32_close(rope(_t(x)).asnumpy(), _numpy_rope(x), 8 * (x.shape[-2] - 1))


def test_pair_rotation_matmul_equals_rotate_pairs() -> None:
    x = RNG.standard_normal((3, 5, 8)).astype(np.float32)
    turned = rotate_pairs(_t(x)).asnumpy()
    np.testing.assert_array_equal(x @ pair_rotation(8), turned)
    np.testing.assert_array_equal(turned[..., 0], -x[..., 1])
    np.testing.assert_array_equal(turned[..., 1], x[..., 0])
    assert "freqs" in [p.name.split(".")[-1] for p in RotaryEmbedding(8).get_parameters()]
    assert len(list(RotaryEmbedding(8).get_parameters())) == 1  # the rotation is no parameter


def test_rope_depends_on_relative_position_only() -> None:
    rope = RotaryEmbedding(8)
    q = np.tile(RNG.standard_normal((1, 8)), (10, 1)).astype(np.float32)  # same vector each frame
    k = np.tile(RNG.standard_normal((1, 8)), (10, 1)).astype(np.float32)
    rq, rk = rope(_t(q)).asnumpy(), rope(_t(k)).asnumpy()
    logits = rq @ rk.T
    # angles up to 9 rad (A * eps each) in logits bounded by |q| |k|
    atol = 8 * 9 * EPS32 * float(np.linalg.norm(q[0]) * np.linalg.norm(k[0]))
    for offset in (-3, 0, 2):
        diagonal = np.diagonal(logits, offset)
        np.testing.assert_allclose(diagonal, diagonal[0], rtol=0, atol=atol)
    np.testing.assert_allclose(np.linalg.norm(rq, axis=1), np.linalg.norm(q, axis=1), rtol=1e-5)
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(7)


# ---------------------------------------------------------------------------------------------
# patch embedding, norms, embedders


def test_patch_embed_equals_strided_conv3d() -> None:
    layer = PatchEmbed3D((1, 2, 2), 3, 5)
    x = RNG.standard_normal((2, 3, 2, 4, 6)).astype(np.float32)
    w, b = layer.proj.weight.asnumpy(), layer.proj.bias.asnumpy()
    patches = x.reshape(2, 3, 2, 1, 2, 2, 3, 2)  # b c t pt h ph w pw
    conv = np.einsum("bctuhpwq,ecupq->bethw", patches, w) + b[None, :, None, None, None]
    expected = conv.reshape(2, 5, -1).transpose(0, 2, 1)
    assert_f32_close(layer(_t(x)).asnumpy(), expected, 32)  # sums of 12 products, and a bias


def test_patch_embed_pads_like_open_sora() -> None:
    layer = PatchEmbed3D((1, 2, 2), 3, 5)
    x = RNG.standard_normal((1, 3, 1, 3, 5)).astype(np.float32)
    padded = np.zeros((1, 3, 1, 4, 6), np.float32)
    padded[..., :3, :5] = x
    assert_f32_close(layer(_t(x)).asnumpy(), layer(_t(padded)).asnumpy(), 16)


def test_layernorm_without_affine_has_no_parameters() -> None:
    x = RNG.standard_normal((2, 4, 6)).astype(np.float32)
    norm = LayerNorm(6, eps=1e-6, affine=False)
    assert list(norm.parameters_and_names()) == []
    expected = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    assert_f32_close(norm(_t(x)).asnumpy(), expected, 16)
    assert [n for n, _ in LayerNorm(6).parameters_and_names()] == ["weight", "bias"]


def test_timestep_embedding_puts_cos_first() -> None:
    emb = TimestepEmbedder(4, frequency_embedding_size=8)
    t = np.array([0.0, 3.0, 999.0], np.float32)
    freqs = np.exp(-np.log(10000) * np.arange(4) / 4)
    args = t[:, None] * freqs[None]
    expected = np.concatenate([np.cos(args), np.sin(args)], 1)
    # float32 angles t * f up to 999 rad: sin / cos round like 999 * eps
    assert_f32_close(emb.timestep_embedding(_t(t)).asnumpy(), expected, 4, scale=float(args.max()))
    assert emb(_t(t)).shape == (3, 4)
    assert [n for n, _ in emb.parameters_and_names()] == [
        "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"]


def test_size_embedder_embeds_each_value_and_repeats_batch() -> None:
    emb = SizeEmbedder(6)
    hw = _t([[64.0, 32.0]])
    out = emb(hw, 3).asnumpy()
    assert out.shape == (3, 12)
    single = emb(_t([[32.0]]), 1).asnumpy()
    assert_f32_close(out[2, 6:], single[0], 16)  # second value = width
    with pytest.raises(ValueError, match="does not divide"):
        emb(_t([[1.0], [2.0]]), 3)


def test_caption_embedder_drops_to_learned_null_caption() -> None:
    emb = CaptionEmbedder(8, 12, uncond_prob=0.1, token_num=5)
    caption = RNG.standard_normal((3, 1, 5, 8)).astype(np.float32)
    forced = emb(_t(caption), False, ms.Tensor(np.array([1, 0, 1]))).asnumpy()
    null = emb(emb.y_embedding.value()[None, None], False).asnumpy()
    assert_f32_close(forced[0], null[0], 16)
    assert_f32_close(forced[2], null[0], 16)
    assert_f32_close(forced[1], emb(_t(caption[1:2]), False).asnumpy()[0], 16)
    assert not emb.y_embedding.requires_grad
    always = CaptionEmbedder(8, 12, uncond_prob=1.0, token_num=5)
    always.y_embedding.set_data(emb.y_embedding.value())
    always.y_proj = emb.y_proj
    assert_f32_close(always(_t(caption), True).asnumpy(), np.broadcast_to(null, forced.shape), 16)


# ---------------------------------------------------------------------------------------------
# attention layers and final layer


def test_attention_qk_norm_normalises_each_head() -> None:
    layer = Attention(16, num_heads=2, qkv_bias=True, qk_norm=True)
    names = [n for n, _ in layer.parameters_and_names()]
    assert names == ["qkv.weight", "qkv.bias", "q_norm.weight", "k_norm.weight", "proj.weight",
                     "proj.bias"]
    q, k, _ = layer.qkv_heads(_t(RNG.standard_normal((2, 5, 16)) * 50))
    rms = np.sqrt((q.asnumpy() ** 2).mean(-1))
    assert_f32_close(rms, np.ones_like(rms), 16)  # the norm's 1e-6 is nothing next to |50 x|^2
    assert "q_norm.weight" not in [n for n, _ in Attention(16, 2).parameters_and_names()]


def test_cross_attention_mask_equals_dropping_padding_tokens() -> None:
    layer = MultiHeadCrossAttention(16, 4)
    x = _t(RNG.standard_normal((2, 6, 16)))
    cond = RNG.standard_normal((2, 7, 16)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0, 0, 0], [1] * 7])
    out = layer(x, _t(cond), ms.Tensor(mask)).asnumpy()
    first = layer(x[:1], _t(cond[:1, :3]), None).asnumpy()
    assert_f32_close(out[:1], first, 64)  # softmax over 3 keys against 7 with 4 masked
    assert_f32_close(out[1:], layer(x[1:], _t(cond[1:]), None).asnumpy(), 64)


def test_final_layer_x_mask_all_true_is_plain() -> None:
    layer = T2IFinalLayer(8, 4, 2)
    x, t = _t(RNG.standard_normal((2, 6, 8))), _t(RNG.standard_normal((2, 8)))
    t0 = _t(RNG.standard_normal((2, 8)))
    plain = layer(x, t).asnumpy()
    all_true = ms.Tensor(np.ones((2, 3), bool))
    assert_f32_close(layer(x, t, all_true, t0, 3, 2).asnumpy(), plain, 16)
    some_false = ms.Tensor(np.array([[True, False, True], [True, True, True]]))
    mixed = layer(x, t, some_false, t0, 3, 2).asnumpy()
    assert_f32_close(mixed[0, :2], plain[0, :2], 16)  # frame 0 generated
    assert np.abs(mixed[0, 2:4] - plain[0, 2:4]).max() > 1e-3  # frame 1 uses t0
