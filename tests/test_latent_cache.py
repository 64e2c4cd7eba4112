"""The VAE latent cache: mirrored npz files, the seed's keys, resuming, bad videos, layouts."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import mindspore as ms
import pytest
from damaged_media import write_damaged_mp4
from numerics import assert_f32_close

from opensora.data.cache_files import load_latent_npz
from opensora.data.latent_cache import cache_latents, main, resolution_folder
from opensora.data.video import read_video
from opensora.models.vae import AutoencoderKL, AutoencoderKLConfig, VideoAutoencoderKL

SAMPLES = Path(__file__).resolve().parent.parent / "data_samples"


@pytest.fixture(scope="module")
def vae() -> VideoAutoencoderKL:
    ms.set_seed(0)
    model = AutoencoderKL(AutoencoderKLConfig(
        block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
        latent_channels=4))
    return VideoAutoencoderKL(model, micro_batch_size=5)


def write_csv(folder: Path, videos: list[str]) -> Path:
    path = folder / "video_caption.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["video", "caption"])
        writer.writerows([v, "a red circle moving left on a black background"] for v in videos)
    return path


@pytest.fixture()
def clips(tmp_path: Path) -> Path:
    (tmp_path / "videos").mkdir()
    for name in ("clip_000.mp4", "clip_001.mp4"):
        shutil.copy(SAMPLES / "videos" / name, tmp_path / "videos" / name)
    return tmp_path


def test_cache_holds_unscaled_moments_of_every_frame(clips: Path, vae) -> None:
    csv_path = write_csv(clips, ["videos/clip_000.mp4", "videos/clip_001.mp4"])
    report = cache_latents(csv_path, clips / "out", vae, progress=False)
    assert (report.written, report.skipped, report.failed) == (2, 0, [])
    cache = load_latent_npz(clips / "out" / "videos" / "clip_000.npz")
    assert set(cache) == {"latent_mean", "latent_std", "fps", "ori_size"}
    video = read_video(clips / "videos" / "clip_000.mp4")
    f = vae.module.downsample_factor
    assert cache["latent_mean"].shape == (4, video.shape[1], 64 // f, 64 // f)
    assert list(cache["ori_size"]) == [64, 64]
    assert float(cache["fps"]) > 0
    mean, std = vae.encode_moments(ms.Tensor(video[None]))
    # the same encoder, maybe on other batches of frames: only the kernels' blocking differs
    assert_f32_close(cache["latent_mean"], mean.asnumpy()[0], 64)
    assert_f32_close(cache["latent_std"], std.asnumpy()[0], 64)


def test_resumes_and_reports_bad_videos_without_stopping(clips: Path, vae) -> None:
    (clips / "videos" / "broken.mp4").write_bytes(b"not a video at all")
    write_damaged_mp4(clips / "videos" / "damaged.mp4")  # container intact, stream damaged
    csv_path = write_csv(clips, ["videos/clip_000.mp4", "videos/missing.mp4",
                                 "videos/broken.mp4", "videos/damaged.mp4",
                                 "videos/clip_001.mp4"])
    first = cache_latents(csv_path, clips / "out", vae, progress=False)
    assert first.written == 2
    assert [(line, video) for line, video, _ in first.failed] == [
        (3, "videos/missing.mp4"), (4, "videos/broken.mp4"), (5, "videos/damaged.mp4")]
    assert "missing.mp4" in first.summary() and "line 4" in first.summary()
    done = clips / "out" / "videos" / "clip_000.npz"
    stamp = done.stat().st_mtime_ns
    second = cache_latents(csv_path, clips / "out", vae, progress=False)
    assert (second.written, second.skipped) == (0, 2)
    assert done.stat().st_mtime_ns == stamp, "a finished file is not rewritten"
    assert not list((clips / "out").rglob("*.tmp*")), "no temporary files left behind"


def test_multi_resolution_layout_resizes(clips: Path, vae) -> None:
    csv_path = write_csv(clips, ["videos/clip_000.mp4"])
    report = cache_latents(csv_path, clips / "out", vae, image_size=(32, 48),
                           multi_resolution=True, progress=False)
    assert report.out_dir == resolution_folder(clips / "out", (32, 48))
    cache = load_latent_npz(clips / "out" / "latent_32x48" / "videos" / "clip_000.npz")
    f = vae.module.downsample_factor
    assert cache["latent_mean"].shape[2:] == (32 // f, 48 // f)
    assert list(cache["ori_size"]) == [32, 48]
    with pytest.raises(ValueError, match="needs image_size"):
        cache_latents(csv_path, clips / "out", vae, multi_resolution=True, progress=False)


def test_bad_csv_is_a_clear_error(tmp_path: Path, vae) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        cache_latents(tmp_path / "nope.csv", tmp_path / "out", vae, progress=False)
    bad = tmp_path / "bad.csv"
    bad.write_text("path,text\nx.mp4,hello\n")
    with pytest.raises(ValueError, match="no 'video' column"):
        cache_latents(bad, tmp_path / "out", vae, progress=False)


def test_cli_exits_non_zero_when_a_video_fails(clips: Path, vae, tmp_path: Path) -> None:
    folder = tmp_path / "vae"
    vae.module.save_pretrained(folder)
    csv_path = write_csv(clips, ["videos/clip_000.mp4", "videos/missing.mp4"])
    with pytest.raises(SystemExit) as exit_info:
        main(["--csv", str(csv_path), "--vae", str(folder), "--out", str(clips / "cli")])
    assert exit_info.value.code == 1
    assert (clips / "cli" / "videos" / "clip_000.npz").is_file()


def test_a_folder_encoded_by_another_vae_is_refused(clips: Path, vae) -> None:
    csv_path = write_csv(clips, ["videos/clip_000.mp4"])
    cache_latents(csv_path, clips / "out", vae, progress=False)
    ms.set_seed(1)
    other = VideoAutoencoderKL(AutoencoderKL(vae.module.config))
    with pytest.raises(ValueError, match="latents of another VAE.*overwrite"):
        cache_latents(csv_path, clips / "out", other, progress=False)
    report = cache_latents(csv_path, clips / "out", other, overwrite=True, progress=False)
    assert report.written == 1
    again = cache_latents(csv_path, clips / "out", other, progress=False)
    assert (again.written, again.skipped) == (0, 1), "the new VAE now owns the folder"
