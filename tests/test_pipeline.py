"""The three-stage text-to-video pipeline and its command line, on small random models."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from numerics import assert_f32_close

from opensora.checkpoint import CheckpointError, save_state_dict
from opensora.data.video import video_info
from opensora.models.vae import AutoencoderKL
from opensora.pipeline import Latents, TextEmbeddings, TextToVideoPipeline, video_file_name
from opensora.presets import build_model, get_preset
from opensora.sample import main as sample_main
from opensora.sample import read_prompts
from opensora.schedulers.iddpm import IDDPM

PROMPTS = ["a red circle moving left on a black background",
           "a blue square moving up on a white background"]


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
                        layers_per_block=1, latent_channels=4)
    return vae.save_pretrained(tmp_path_factory.mktemp("vae") / "vae")


@pytest.fixture(scope="module")
def pipeline(vae_folder: Path) -> TextToVideoPipeline:
    return TextToVideoPipeline.from_preset("tiny", vae_path=vae_folder, num_sampling_steps=3,
                                           num_frames=4, image_size=(32, 32),
                                           allow_untrained=True)


def test_the_scheduler_follows_the_preset_noise_schedule(vae_folder: Path) -> None:
    """A transformer trained under one beta schedule must be sampled under the same one."""
    cosine = replace(get_preset("tiny"), noise_schedule="squaredcos_cap_v2")
    pipe = TextToVideoPipeline.from_preset(cosine, vae_path=vae_folder, num_sampling_steps=10,
                                           allow_untrained=True)
    expected = IDDPM(num_sampling_steps=10, noise_schedule="squaredcos_cap_v2")
    np.testing.assert_array_equal(pipe.scheduler.alphas_cumprod, expected.alphas_cumprod)
    assert not np.array_equal(pipe.scheduler.alphas_cumprod,
                              IDDPM(num_sampling_steps=10).alphas_cumprod)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(num_frames=0), "num_frames must be at least 1, got 0"),
    (dict(image_size=(63, 65)), r"multiple of the VAE's 2x downsampling, got \(63, 65\); e.g. "
                                r"\(64, 64\)"),
])
def test_bad_clip_sizes_are_refused(vae_folder: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TextToVideoPipeline.from_preset("tiny", vae_path=vae_folder, num_sampling_steps=3,
                                        allow_untrained=True, **kwargs)


def test_shapes_and_files(pipeline: TextToVideoPipeline, tmp_path: Path) -> None:
    assert pipeline.latent_shape() == (4, 4, 16, 16)
    videos = pipeline(PROMPTS, seeds=[5, 6], output_dir=tmp_path)
    assert [v.frames.shape for v in videos] == [(4, 32, 32, 3)] * 2
    assert videos[0].path.name == video_file_name(0, PROMPTS[0], 5)
    info = video_info(videos[1].path)
    assert (info.num_frames, info.height, info.width) == (4, 32, 32)
    assert (tmp_path / "text_embeddings.npz").is_file() and (tmp_path / "latents.npz").is_file()


def test_seeds_reproduce_and_do_not_depend_on_the_batch(pipeline: TextToVideoPipeline) -> None:
    both = pipeline.sample_latents(pipeline.encode_prompts(PROMPTS), seeds=[1, 2]).latents
    alone = pipeline.sample_latents(pipeline.encode_prompts(PROMPTS[1:]), seeds=[2]).latents
    # 3 guided steps of the tiny STDiT2 on batches of 2 and 1 (latents grow to a few hundred):
    # the matmul kernels may block another batch differently, ~1e3 roundings of the magnitude
    assert_f32_close(both[1], alone[0], 1024)
    other = pipeline.sample_latents(pipeline.encode_prompts(PROMPTS[1:]), seeds=[3]).latents
    assert np.abs(other - alone).max() > 1e-2


def test_stages_run_separately(pipeline: TextToVideoPipeline, tmp_path: Path) -> None:
    embeddings = pipeline.encode_prompts(PROMPTS[:1])
    embeddings.save(tmp_path / "text.npz")
    again = TextEmbeddings.load(tmp_path / "text.npz")
    assert again.prompts == PROMPTS[:1]
    np.testing.assert_array_equal(again.y, embeddings.y)
    assert embeddings.y.shape == (1, 1, 16, 64) and embeddings.mask.shape == (1, 16)
    latents = pipeline.sample_latents(again, seeds=[0])
    latents.save(tmp_path / "latents.npz")
    loaded = Latents.load(tmp_path / "latents.npz")
    first = pipeline.decode(latents)[0].frames
    np.testing.assert_array_equal(pipeline.decode(loaded)[0].frames, first)


def test_conditioned_frames_are_kept(pipeline: TextToVideoPipeline) -> None:
    embeddings = pipeline.encode_prompts(PROMPTS[:1])
    shape = (1, *pipeline.latent_shape())
    x_cond = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    x_mask = np.array([[False, True, True, True]])
    out = pipeline.sample_latents(embeddings, [0], x_cond=x_cond, x_mask=x_mask).latents
    assert_f32_close(out[:, :, 0], x_cond[:, :, 0], 4)


@pytest.mark.slow  # compiles or differentiates the whole model: make test only
def test_graph_mode_samples_like_pynative(pipeline: TextToVideoPipeline) -> None:
    graph = TextToVideoPipeline(pipeline.preset, pipeline.vae, pipeline.text_encoder,
                                pipeline.model, pipeline.scheduler, pipeline.num_frames,
                                pipeline.image_size, pipeline.fps, mode="graph")
    embeddings = pipeline.encode_prompts(PROMPTS[:1])
    # float32 op order differs when compiled: ~1e3 roundings over 3 steps of the tiny STDiT2
    assert_f32_close(graph.sample_latents(embeddings, [4]).latents,
                     pipeline.sample_latents(embeddings, [4]).latents, 1024)
    x_cond = np.zeros((1, *pipeline.latent_shape()), np.float32)
    x_mask = np.array([[False, True, True, True]])
    assert_f32_close(
        graph.sample_latents(embeddings, [4], x_cond=x_cond, x_mask=x_mask).latents,
        pipeline.sample_latents(embeddings, [4], x_cond=x_cond, x_mask=x_mask).latents, 1024)
    with pytest.raises(TypeError, match="no argument"):
        graph.denoiser(None, None, None, colour=1)
    with pytest.raises(ValueError, match="mode"):
        TextToVideoPipeline(pipeline.preset, pipeline.vae, pipeline.text_encoder,
                            pipeline.model, pipeline.scheduler, mode="fast")


def test_bad_input_errors(pipeline: TextToVideoPipeline, vae_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        pipeline.encode_prompts(["", "x"])
    with pytest.raises(ValueError, match="2 seeds for 1 prompts"):
        pipeline.sample_latents(pipeline.encode_prompts(PROMPTS[:1]), seeds=[1, 2])
    with pytest.raises(FileNotFoundError, match="no trained STDiT2 weights"):
        TextToVideoPipeline.from_preset("tiny", vae_path=vae_folder,
                                        model_path=tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="VAE weights"):
        TextToVideoPipeline.from_preset("tiny", vae_path=tmp_path / "novae")
    wrong = build_model("small")  # hidden 384: does not fit the tiny preset
    save_state_dict(wrong, tmp_path / "wrong.safetensors")
    with pytest.raises(CheckpointError, match="do not fit preset 'tiny'"):
        TextToVideoPipeline.from_preset("tiny", vae_path=vae_folder,
                                        model_path=tmp_path / "wrong.safetensors")
    with pytest.raises(FileNotFoundError, match="stage 2 output"):
        Latents.load(tmp_path / "missing.npz")


def test_cli_all_stages_and_separately(vae_folder: Path, tmp_path: Path) -> None:
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("# a comment\n" + PROMPTS[0] + "\n\n")
    assert read_prompts([PROMPTS[1]], str(prompt_file)) == [PROMPTS[1], PROMPTS[0]]
    common = ["--vae-path", str(vae_folder), "--num-sampling-steps", "2", "--num-frames", "4",
              "--allow-untrained", "-o", str(tmp_path / "out")]
    assert sample_main(["--prompt-file", str(prompt_file), "--stage", "text", *common]) == 0
    assert sample_main(["--stage", "latents", "--seeds", "7", *common]) == 0
    assert sample_main(["--stage", "decode", "--format", "gif", *common]) == 0
    assert (tmp_path / "out" / video_file_name(0, PROMPTS[0], 7, ".gif")).is_file()
    assert sample_main(["--stage", "text", *common]) == 1  # no prompts: clear error, exit 1
