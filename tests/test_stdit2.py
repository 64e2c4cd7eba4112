"""STDiT2 (Open-Sora 1.1): strict loading and parity with the PyTorch reference, graph mode,
recompute, frame masks, dynamic sizes, checkpoint formats and the XL parameter count."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from numerics import EPS32, assert_f32_close

from opensora.checkpoint import CheckpointError, read_state_dict, save_state_dict
from opensora.models.stdit2 import STDiT2

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
MODEL_DIR = REFERENCE / "stdit2_tiny"
# Parity with PyTorch: a depth-2, width-96 transformer (attention, MLP, adaLN, sin-cos of t up to
# 999) run by two libraries differs by ~1e3 float32 roundings of each compared output's magnitude
PARITY_STEPS = 1024
# the same model two ways (graph mode against PyNative, a different batch or mask path): fused and
# reordered float32 ops, ~1e2 roundings
SAME_MODEL_STEPS = 256
MICRO = ("num_frames", "height", "width", "ar", "fps")
HOOKED = ("x_embedder", "t_embedder", "t_block", "t_block_temp", "y_embedder", "csize_embedder",
          "ar_embedder", "fl_embedder", "fps_embedder", "blocks.0", "blocks.1", "final_layer")


@pytest.fixture(scope="module")
def case() -> dict[str, np.ndarray]:
    with np.load(REFERENCE / "stdit2_case_plain.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def model() -> STDiT2:
    net = STDiT2.from_pretrained(MODEL_DIR, attn_backend="math")
    net.set_train(False)
    return net


def _inputs(case: dict[str, np.ndarray]) -> tuple[list[ms.Tensor], dict[str, ms.Tensor]]:
    args = [ms.Tensor(case[k]) for k in ("x", "timestep", "y", "mask")]
    return args, {k: ms.Tensor(case[k]) for k in MICRO}


def _submodule(net: ms.nn.Cell, dotted: str) -> ms.nn.Cell:
    for part in dotted.split("."):
        net = net[int(part)] if part.isdigit() else getattr(net, part)
    return net


def test_reference_parity_with_intermediates(case) -> None:
    net = STDiT2.from_pretrained(MODEL_DIR, attn_backend="math")
    net.set_train(False)
    captured: dict[str, np.ndarray] = {}
    for name in HOOKED:
        def hook(cell, inputs, output, name=name):
            captured[name] = output.asnumpy()
        _submodule(net, name).register_forward_hook(hook)
    args, micro = _inputs(case)
    out = net(*args, None, **micro).asnumpy()
    assert_f32_close(out, case["out"], PARITY_STEPS)
    for name in HOOKED:
        assert_f32_close(captured[name], case[f"inter.{name}.0"], PARITY_STEPS, err_msg=name)


def test_state_dict_keys_are_open_soras(model) -> None:
    ours = {name: tuple(p.shape) for name, p in model.parameters_and_names()}
    theirs = {k: tuple(v.shape) for k, v in read_state_dict(MODEL_DIR).items()}
    assert ours == theirs


def test_chunked_attention_backend_matches_reference(case) -> None:
    net = STDiT2.from_pretrained(MODEL_DIR, attn_backend="chunked", attn_block_size=5)
    net.set_train(False)
    args, micro = _inputs(case)
    assert_f32_close(net(*args, None, **micro).asnumpy(), case["out"], PARITY_STEPS)


@pytest.mark.slow  # compiles or differentiates the whole model: make test only
def test_graph_mode_matches_pynative(model, case) -> None:
    args, micro = _inputs(case)
    x_mask = ms.Tensor(np.array([[True, False, True, True], [False, False, True, True]]))
    graph = ms.jit(model.construct)
    for mask in (None, x_mask):
        eager = model(*args, mask, **micro).asnumpy()
        assert_f32_close(graph(*args, mask, **micro).asnumpy(), eager, SAME_MODEL_STEPS)


def test_x_mask_switches_frames_to_t0(model, case) -> None:
    args, micro = _inputs(case)
    plain = model(*args, None, **micro).asnumpy()
    all_true = ms.Tensor(np.ones((2, 4), bool))
    assert_f32_close(model(*args, all_true, **micro).asnumpy(), plain, SAME_MODEL_STEPS)
    # sample 0 at timestep 999 with frame 0 given as a clean condition frame: the t0 branch
    # changes its frames (through temporal attention, all of them), sample 1 keeps all True
    x_mask = ms.Tensor(np.array([[False, True, True, True], [True, True, True, True]]))
    masked = model(*args, x_mask, **micro).asnumpy()
    assert np.abs(masked[0, :, 0] - plain[0, :, 0]).max() > 1e-2
    assert_f32_close(masked[1], plain[1], SAME_MODEL_STEPS)


def _loss_and_grads(recompute: bool, args, x_mask, micro) -> tuple[float, list[np.ndarray]]:
    net = STDiT2.from_pretrained(MODEL_DIR, attn_backend="math", enable_recompute=recompute)
    net.set_train(True)
    net.y_embedder.uncond_prob = 0.0  # no random caption dropout: compare like with like
    params = net.trainable_params()

    def loss_fn(*inputs):
        return (net(*inputs, x_mask, **micro) ** 2).mean()

    loss, grads = ms.jit(ms.value_and_grad(loss_fn, None, params))(*args)
    return float(loss.asnumpy()), [g.asnumpy() for g in grads]


@pytest.mark.slow  # compiles or differentiates the whole model: make test only
def test_recompute_gives_the_same_gradients(case) -> None:
    args, micro = _inputs(case)
    x_mask = ms.Tensor(np.array([[True, False, True, True], [True, True, True, True]]))
    plain_loss, plain_grads = _loss_and_grads(False, args, x_mask, micro)
    loss, grads = _loss_and_grads(True, args, x_mask, micro)
    assert loss == pytest.approx(plain_loss, rel=SAME_MODEL_STEPS * EPS32, abs=0)
    assert len(grads) == len(plain_grads) == 81
    for recomputed, plain_grad in zip(grads, plain_grads, strict=True):  # each at its magnitude
        assert_f32_close(recomputed, plain_grad, SAME_MODEL_STEPS)
    assert max(np.abs(g).max() for g in plain_grads) > 0


@pytest.mark.parametrize("shape", [(3, 12, 20), (1, 8, 8), (2, 11, 9)])
def test_dynamic_input_sizes(model, case, shape) -> None:
    t, h, w = shape
    x = ms.Tensor(np.random.default_rng(1).standard_normal((2, 4, t, h, w)).astype(np.float32))
    args, micro = _inputs(case)
    micro = dict(micro, num_frames=ms.Tensor(np.full(2, t, np.float32)),
                 height=ms.Tensor(np.full(2, h * 8, np.float32)),
                 width=ms.Tensor(np.full(2, w * 8, np.float32)))
    out = model(x, *args[1:], None, **micro).asnumpy()
    assert out.shape == (2, 8, t, h, w)
    assert np.isfinite(out).all()


def test_identical_frames_give_identical_outputs(model, case) -> None:
    """RoPE is relative: on a clip of identical frames temporal attention averages equal values
    whatever its weights, so every frame comes out alike (chapter 3 shows why that matters)."""
    args, micro = _inputs(case)
    frame = np.random.default_rng(2).standard_normal((2, 4, 1, 8, 8)).astype(np.float32)
    still = ms.Tensor(np.repeat(frame, 6, axis=2))
    micro = dict(micro, num_frames=ms.Tensor(np.full(2, 6, np.float32)))
    out = model(still, *args[1:], None, **micro).asnumpy()
    assert_f32_close(out, np.broadcast_to(out[:, :, :1], out.shape), SAME_MODEL_STEPS)


def test_caption_mask_batch_is_repeated_for_cfg(model, case) -> None:
    """Classifier-free guidance doubles the batch; the prompt mask of batch 1 is reused."""
    args, micro = _inputs(case)
    one_mask = ms.Tensor(case["mask"][:1])
    out = model(args[0], args[1], args[2], one_mask, None, **micro).asnumpy()
    same = model(args[0], args[1], args[2], ms.Tensor(np.tile(case["mask"][:1], (2, 1))), None,
                 **micro).asnumpy()
    assert_f32_close(out, same, SAME_MODEL_STEPS)


def test_bare_weights_file_infers_the_config(tmp_path, case) -> None:
    weights = tmp_path / "stdit2.safetensors"
    save_state_dict(read_state_dict(MODEL_DIR), weights)
    net = STDiT2.from_pretrained(weights, input_sq_size=128, attn_backend="math")
    net.set_train(False)
    args, micro = _inputs(case)
    assert_f32_close(net(*args, None, **micro).asnumpy(), case["out"], PARITY_STEPS)


def test_strict_loading_reports_mismatches(tmp_path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(MODEL_DIR, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, depth=3, qk_norm=False)))
    with pytest.raises(CheckpointError) as info:
        STDiT2.from_pretrained(folder)
    message = str(info.value)
    assert "blocks.2.attn.qkv.weight" in message and "q_norm" in message
    with pytest.raises(FileNotFoundError, match="not found"):
        STDiT2.from_pretrained(tmp_path / "missing")


def test_bad_arguments_are_explained(model, case) -> None:
    args, _ = _inputs(case)
    with pytest.raises(ValueError, match="micro-conditions"):
        model(*args)
    with pytest.raises(TypeError, match="unknown STDiT keyword"):
        STDiT2(hidden_size=96, depth=1, num_heads=4, hidden_sise=3)
    with pytest.raises(ValueError, match="divisible by 3"):
        STDiT2(hidden_size=128, depth=1, num_heads=4)
    with pytest.raises(ValueError, match="qk_norm_legacy"):
        STDiT2(hidden_size=96, depth=1, num_heads=4, qk_norm_legacy=False)


