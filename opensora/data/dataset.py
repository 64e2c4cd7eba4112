"""The training data: a video-caption csv read as batches, from videos or from cached latents.

A row of the csv names a clip (path relative to the csv) and its caption. A sample is a random
window of `num_frames` frames, `frame_interval` apart, resized and centre-cropped; or, when the
latent and text caches of `opensora.data.latent_cache` / `opensora.data.text_cache` are given, the
same window cut from the cached VAE posterior (mean + std * noise) and the cached T5 features,
so training never runs the VAE or T5.

Open-Sora 1.1 trains on several resolutions, aspect ratios and durations at once through
*buckets*: a bucket config maps a resolution name to {num_frames: (probability, batch_size)}.
Every epoch each clip is assigned one bucket (the largest resolution and duration it is big and
long enough for, accepted with that bucket's probability, otherwise the next one down); clips of
one bucket are batched together at the bucket's batch size and aspect ratio, so a batch is
always one shape. Without a bucket config there is one bucket: `image_size` x `num_frames`.

Everything random (bucket draws, shuffles, frame windows, posterior noise) is a function of
(seed, epoch, sample), so a resumed run sees exactly the batches it would have seen.

Bad rows (missing or undecodable video, clip too short, empty caption, missing cache file) are
skipped and counted in `dataset.skipped`, with one warning; a clip that fails only when it is
loaded is replaced by the next loadable clip and counted in `dataset.runtime_skipped`.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mindspore.dataset as ds
import numpy as np

from opensora.data.cache_files import cache_path, load_latent_npz, load_text_embedding
from opensora.data.video import VideoReadError, frame_indices, read_video, video_info

SD_SCALING_FACTOR = 0.18215

# ---------------------------------------------------------------------------------------------
# aspect ratios (Open-Sora's `aspect.py` semantics: ratio key = height / width, value (H, W))

# height / width of the ratios Open-Sora tabulates, portrait (< 1) to landscape (> 1)
STANDARD_RATIOS: tuple[float, ...] = (
    0.38, 0.43, 0.48, 0.50, 0.53, 0.54, 0.56, 0.62, 0.67, 0.75, 1.00,
    1.33, 1.50, 1.78, 1.89, 2.00, 2.08,
)

# resolution name -> pixel count (H * W); the tiny names serve the CPU presets
RESOLUTIONS: dict[str, int] = {
    "32": 32 * 32,
    "64": 64 * 64,
    "96": 96 * 96,
    "128": 128 * 128,
    "144p": 144 * 256,
    "256": 256 * 256,
    "240p": 240 * 426,
    "360p": 360 * 640,
    "512": 512 * 512,
    "480p": 480 * 854,
    "720p": 720 * 1280,
    "1024": 1024 * 1024,
    "1080p": 1080 * 1920,
}


def aspect_ratio_table(num_pixels: int, ratios: Sequence[float] = STANDARD_RATIOS,
                       multiple: int = 8) -> dict[str, tuple[int, int]]:
    """{"h/w ratio": (H, W)} with H * W close to `num_pixels`, sides multiples of `multiple`
    (so the VAE and the patch embedder divide them)."""
    table = {}
    for ratio in ratios:
        height = max(multiple, round(math.sqrt(num_pixels * ratio) / multiple) * multiple)
        width = max(multiple, round(math.sqrt(num_pixels / ratio) / multiple) * multiple)
        table[f"{ratio:.2f}"] = (int(height), int(width))
    return table


def get_closest_ratio(height: int, width: int, ratios: Mapping[str, Any]) -> str:
    """The ratio key nearest to height / width."""
    aspect = height / width
    return min(ratios, key=lambda key: abs(float(key) - aspect))


# ---------------------------------------------------------------------------------------------
# buckets


BucketId = tuple[str, int, str]  # (resolution name, num_frames, aspect-ratio key)


class Bucket:
    """Open-Sora 1.1's bucket config: {resolution: {num_frames: (probability, batch_size)}}.

    Resolutions are tried from the largest down and durations from the longest down; a clip
    fits a (resolution, num_frames) cell when it has at least 80% of its pixels and the
    (num_frames - 1) * frame_interval + 1 frames a window needs (exactly one frame for the
    image cell `1`), and takes it with the cell's probability. A `batch_size` of None or 0
    disables a cell.
    """

    approx = 0.8

    def __init__(self, bucket_config: Mapping[str, Mapping[int, Sequence[Any]]],
                 resolutions: Mapping[str, int] | None = None):
        resolutions = dict(RESOLUTIONS if resolutions is None else resolutions)
        unknown = [name for name in bucket_config if name not in resolutions]
        if unknown:
            raise ValueError(f"bucket config names unknown resolution(s) {unknown}; "
                             f"use names from {sorted(resolutions, key=resolutions.get)}")
        self.config: dict[str, dict[int, tuple[float, int]]] = OrderedDict()
        for name in sorted(bucket_config, key=lambda n: resolutions[n], reverse=True):
            cells = OrderedDict()
            for frames in sorted(bucket_config[name], key=int, reverse=True):
                value = bucket_config[name][frames]
                if not isinstance(value, Sequence) or len(value) != 2:
                    raise ValueError(f"bucket {name!r} / {frames} frames: expected "
                                     f"(probability, batch_size), got {value!r}")
                prob, batch = float(value[0]), int(value[1] or 0)
                if not 0.0 <= prob <= 1.0:
                    raise ValueError(f"bucket {name!r} / {frames}: probability {prob} is not "
                                     "in [0, 1]")
                if batch > 0 and prob > 0:
                    cells[int(frames)] = (prob, batch)
            if cells:
                self.config[name] = cells
        if not self.config:
            raise ValueError("bucket config has no cell with a probability > 0 and a batch size")
        self.pixels = {name: resolutions[name] for name in self.config}
        self.ratios = {name: aspect_ratio_table(resolutions[name]) for name in self.config}
        self.cell_ids = {(name, frames): i for i, (name, frames) in enumerate(
            (n, f) for n, cells in self.config.items() for f in cells)}

    @classmethod
    def single(cls, image_size: tuple[int, int], num_frames: int, batch_size: int) -> Bucket:
        """One fixed shape, as a bucket, so both cases share one code path."""
        height, width = (int(s) for s in image_size)
        name = f"{height}x{width}"
        bucket = cls({name: {num_frames: (1.0, batch_size)}}, {name: height * width})
        bucket.ratios[name] = {f"{height / width:.2f}": (height, width)}
        bucket.approx = 0.0  # one shape for every clip: resize whatever comes
        return bucket

    def get_bucket_id(self, num_frames: int, height: int, width: int, frame_interval: int = 1,
                      rng: np.random.Generator | None = None) -> BucketId | None:
        """Where a clip of (num_frames, height, width) goes this epoch; None if nowhere."""
        rng = rng or np.random.default_rng()
        for name, cells in self.config.items():
            if height * width < self.pixels[name] * self.approx:
                continue
            for frames, (prob, _) in cells.items():
                fits = num_frames == 1 if frames == 1 else (
                    num_frames > 1 and num_frames >= (frames - 1) * frame_interval + 1)
                if not fits:
                    continue
                if prob >= 1.0 or rng.random() < prob:
                    return name, frames, get_closest_ratio(height, width, self.ratios[name])
                break  # Open-Sora: a refused draw moves on to the next resolution down
        return None

    def get_thw(self, bucket_id: BucketId) -> tuple[int, int, int]:
        name, frames, ratio = bucket_id
        height, width = self.ratios[name][ratio]
        return frames, height, width

    def get_batch_size(self, bucket_id: BucketId) -> int:
        return self.config[bucket_id[0]][bucket_id[1]][1]


# ---------------------------------------------------------------------------------------------
# rows


@dataclass(frozen=True)
class Row:
    """One usable csv row, with what bucketing needs to know about the clip."""

    line: int  # csv line number (header is line 1)
    video: Path
    caption: str
    num_frames: int
    height: int
    width: int
    fps: float
    latent_path: Path | None = None
    text_path: Path | None = None


@dataclass(frozen=True)
class BatchSpec:
    """What one training step reads: which rows, at which shape, in which epoch."""

    epoch: int
    bucket: BucketId
    indices: tuple[int, ...]


# ---------------------------------------------------------------------------------------------
# the dataset


class VideoCaptionDataset:
    """Rows of a `video,caption` csv, served as whole batches (see the module docstring).

    `latent_folder` / `text_folder` mirror the video paths with `.npz` files; give both, either
    or neither. With latents, `latent_scaling_factor` multiplies mean and std (the VAE's
    0.18215), and a batch's `x` is the latent; otherwise `x` is the clip in [-1, 1].
    """

    def __init__(self, csv_path: str | os.PathLike, num_frames: int = 16,
                 frame_interval: int = 1, image_size: tuple[int, int] = (64, 64),
                 batch_size: int = 4, bucket_config: Mapping[str, Any] | None = None,
                 latent_folder: str | os.PathLike | None = None,
                 text_folder: str | os.PathLike | None = None, seed: int = 0,
                 latent_scaling_factor: float = SD_SCALING_FACTOR, drop_last: bool = True,
                 video_column: str = "video", caption_column: str = "caption",
                 warn: bool = True):
        self.csv_path = Path(csv_path)
        if not self.csv_path.is_file():
            raise FileNotFoundError(f"caption csv {self.csv_path} not found")
        if num_frames < 1 or frame_interval < 1 or batch_size < 1:
            raise ValueError(f"num_frames ({num_frames}), frame_interval ({frame_interval}) and "
                             f"batch_size ({batch_size}) must be positive")
        self.num_frames = int(num_frames)
        self.frame_interval = int(frame_interval)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.seed = int(seed)
        self.drop_last = drop_last
        self.latent_folder = Path(latent_folder) if latent_folder else None
        self.text_folder = Path(text_folder) if text_folder else None
        self.latent_scaling_factor = float(latent_scaling_factor)
        self.bucket = (Bucket(bucket_config) if bucket_config
                       else Bucket.single(self.image_size, self.num_frames, batch_size))
        self.skipped: Counter[str] = Counter()
        self.skipped_lines: list[tuple[int, str]] = []
        self.runtime_skipped: Counter[str] = Counter()
        self.rows = self._scan(video_column, caption_column)
        if warn and self.skipped:
            shown = "; ".join(f"line {line}: {why}" for line, why in self.skipped_lines[:5])
            warnings.warn(
                f"{self.csv_path}: skipped {sum(self.skipped.values())} bad row(s) "
                f"({dict(self.skipped)}); {shown}{' ...' if len(self.skipped_lines) > 5 else ''}",
                stacklevel=2)
        if not self.rows:
            raise ValueError(f"{self.csv_path}: no usable rows ({dict(self.skipped)} skipped)")

    # ---- scanning

    @property
    def uses_latents(self) -> bool:
        return self.latent_folder is not None

    @property
    def uses_text_cache(self) -> bool:
        return self.text_folder is not None

    @property
    def column_names(self) -> list[str]:
        """Columns of every batch, in order (the GeneratorDataset's column names)."""
        text = ["y", "mask"] if self.uses_text_cache else ["caption"]
        return ["x", *text, "num_frames", "height", "width", "ar", "fps", "index"]

    def _skip(self, line: int, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        self.skipped_lines.append((line, detail))

    def _scan(self, video_column: str, caption_column: str) -> list[Row]:
        with open(self.csv_path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            missing = [c for c in (video_column, caption_column) if c not in columns]
            if missing:
                raise ValueError(f"{self.csv_path}: missing column(s) {missing}; the csv has "
                                 f"{columns}")
            raw = [(i + 2, r.get(video_column) or "", r.get(caption_column) or "")
                   for i, r in enumerate(reader)]
        root = self.csv_path.parent
        span = (self.min_frames() - 1) * self.frame_interval + 1
        rows = []
        for line, video, caption in raw:
            if not caption.strip():
                self._skip(line, "empty caption", "empty caption")
                continue
            if not video.strip():
                self._skip(line, "missing video", "empty video path")
                continue
            path = Path(video) if Path(video).is_absolute() else root / video
            row = self._probe(line, path, video, caption.strip(), root)
            if row is None:
                continue
            if row.num_frames < span:
                self._skip(line, "too short", f"{video} has {row.num_frames} frames, need {span}")
                continue
            rows.append(row)
        return rows

    def min_frames(self) -> int:
        return min(frames for cells in self.bucket.config.values() for frames in cells)

    def _probe(self, line: int, path: Path, video: str, caption: str, root: Path) -> Row | None:
        text_path = None
        if self.text_folder is not None:
            text_path = cache_path(self.text_folder, video, root)
            if not text_path.is_file():
                self._skip(line, "missing text cache", f"no text cache {text_path}")
                return None
        if self.latent_folder is not None:
            latent_path = cache_path(self.latent_folder, video, root)
            try:
                with np.load(latent_path) as data:
                    shape = data["latent_mean"].shape
                    fps = float(data["fps"]) if "fps" in data.files else 8.0
                    ori = data["ori_size"] if "ori_size" in data.files else None
            except (OSError, KeyError, ValueError) as exc:
                self._skip(line, "bad latent cache", f"{latent_path}: {exc}")
                return None
            height, width = (int(ori[0]), int(ori[1])) if ori is not None else (
                shape[2] * 8, shape[3] * 8)
            return Row(line, path, caption, int(shape[1]), height, width, fps, latent_path,
                       text_path)
        try:
            info = video_info(path)
        except VideoReadError as exc:
            reason = "missing video" if not path.is_file() else "corrupt video"
            self._skip(line, reason, str(exc))
            return None
        return Row(line, path, caption, info.num_frames, info.height, info.width, info.fps,
                   None, text_path)

    # ---- the batch plan

    def __len__(self) -> int:
        return len(self.rows)

    def epoch_plan(self, epoch: int) -> list[BatchSpec]:
        """This epoch's batches: bucket draws, shuffles and chunking, all from (seed, epoch)."""
        groups: dict[BucketId, list[int]] = OrderedDict()
        for index, row in enumerate(self.rows):
            rng = np.random.default_rng([self.seed, epoch, index, 1])
            bucket_id = self.bucket.get_bucket_id(row.num_frames, row.height, row.width,
                                                  self.frame_interval, rng)
            if bucket_id is not None:
                groups.setdefault(bucket_id, []).append(index)
        rng = np.random.default_rng([self.seed, epoch, 2])
        batches = []
        for bucket_id, members in groups.items():
            members = [members[i] for i in rng.permutation(len(members))]
            size = self.bucket.get_batch_size(bucket_id)
            stop = len(members) - len(members) % size if self.drop_last else len(members)
            for start in range(0, stop, size):
                batches.append(BatchSpec(epoch, bucket_id, tuple(members[start:start + size])))
        return [batches[i] for i in rng.permutation(len(batches))]

    def steps_per_epoch(self, epoch: int = 0) -> int:
        return len(self.epoch_plan(epoch))

    def plan(self, start_step: int, num_steps: int) -> list[BatchSpec]:
        """Batches for global steps [start_step, start_step + num_steps), across epochs."""
        out: list[BatchSpec] = []
        epoch, seen = 0, 0
        while len(out) < num_steps:
            batches = self.epoch_plan(epoch)
            if not batches:
                raise ValueError(f"{self.csv_path}: no full batch in epoch {epoch}; lower the "
                                 f"batch size (have {len(self.rows)} usable rows)")
            if seen + len(batches) > start_step:
                offset = max(0, start_step - seen)
                out.extend(batches[offset : offset + num_steps - len(out)])
            seen += len(batches)
            epoch += 1
        return out

    # ---- loading

    def load_sample(self, index: int, bucket_id: BucketId, epoch: int) -> dict[str, np.ndarray]:
        """One sample of `bucket_id`'s shape; raises VideoReadError / ValueError if unreadable."""
        row = self.rows[index]
        frames, height, width = self.bucket.get_thw(bucket_id)
        rng = np.random.default_rng([self.seed, epoch, index, 3])
        if row.latent_path is not None:
            cache = load_latent_npz(row.latent_path)
            mean, std = cache["latent_mean"], cache["latent_std"]
            f = int(round(row.height / mean.shape[2]))
            if (mean.shape[2] * f, mean.shape[3] * f) != (height, width):
                raise ValueError(f"{row.latent_path}: latents of a {mean.shape[2] * f}x"
                                 f"{mean.shape[3] * f} clip cannot fill a {height}x{width} "
                                 "bucket; cache latents at the bucket resolution")
            picks = frame_indices(mean.shape[1], frames, self.frame_interval, None, rng)
            noise = rng.standard_normal(mean[:, picks].shape).astype(np.float32)
            x = (mean[:, picks] + std[:, picks] * noise) * self.latent_scaling_factor
        else:
            x = read_video(row.video, frames, self.frame_interval, (height, width), None, rng)
        sample = {"x": x.astype(np.float32)}
        if row.text_path is not None:
            sample["y"], sample["mask"] = load_text_embedding(row.text_path)
        else:
            sample["caption"] = np.array(row.caption)
        sample.update(
            num_frames=np.float32(frames), height=np.float32(height), width=np.float32(width),
            ar=np.float32(height / width), fps=np.float32(row.fps / self.frame_interval),
            index=np.int32(index))
        return sample

    def load_batch(self, spec: BatchSpec) -> dict[str, np.ndarray]:
        """Stack a batch; an unreadable clip is replaced by the next readable one (counted)."""
        samples = []
        for index in spec.indices:
            for attempt in range(len(self.rows)):
                candidate = (index + attempt) % len(self.rows)
                try:
                    samples.append(self.load_sample(candidate, spec.bucket, spec.epoch))
                    break
                except (VideoReadError, ValueError, OSError, KeyError) as exc:
                    self.runtime_skipped[type(exc).__name__] += 1
                    warnings.warn(f"skipping line {self.rows[candidate].line} "
                                  f"({self.rows[candidate].video.name}): {exc}", stacklevel=2)
            else:
                raise RuntimeError(f"{self.csv_path}: no row could be loaded")
        return {name: np.stack([s[name] for s in samples]) for name in self.column_names}

    def batches(self, start_step: int, num_steps: int) -> Iterator[dict[str, np.ndarray]]:
        """The batches of `plan`, loaded in this process (the simple path, no workers)."""
        for spec in self.plan(start_step, num_steps):
            yield self.load_batch(spec)


class _BatchSource:
    """Random-access source for GeneratorDataset: item i is batch i of a plan, as a tuple of
    numpy arrays in `dataset.column_names` order."""

    def __init__(self, dataset: VideoCaptionDataset, plan: list[BatchSpec]):
        self.dataset = dataset
        self.plan = plan

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> tuple[np.ndarray, ...]:
        batch = self.dataset.load_batch(self.plan[int(i)])
        return tuple(batch[name] for name in self.dataset.column_names)


def create_dataloader(dataset: VideoCaptionDataset, start_step: int, num_steps: int,
                      num_workers: int = 1, multiprocessing: bool = False,
                      prefetch: int = 2, plan: list[BatchSpec] | None = None) -> Any:
    """A `mindspore.dataset.GeneratorDataset` over the batches of steps
    [start_step, start_step + num_steps), in order.

    Batches are whole items (buckets make their sizes differ), decoded by `num_workers`
    threads, or processes with `multiprocessing` (decoding then runs truly in parallel; counts
    of clips that fail while loading stay in the workers). Iterate with
    `create_dict_iterator(num_epochs=1, output_numpy=True)`. `plan` replaces the dataset's
    own plan of those steps (e.g. a rank's share of it, `opensora.parallel.shard_plan`).
    """
    ds.config.set_prefetch_size(max(1, prefetch))
    source = _BatchSource(dataset, plan if plan is not None
                          else dataset.plan(start_step, num_steps))
    return ds.GeneratorDataset(source, column_names=dataset.column_names, shuffle=False,
                               num_parallel_workers=max(1, num_workers),
                               python_multiprocessing=multiprocessing and num_workers > 1)


def subset_csv(csv_path: str | os.PathLike, out_path: str | os.PathLike, max_rows: int) -> Path:
    """The first `max_rows` rows of a csv, with video paths made absolute so the copy can live
    anywhere (a quick run on a few clips)."""
    csv_path, out_path = Path(csv_path), Path(out_path)
    with open(csv_path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        rows = [row for _, row in zip(range(max_rows), reader)]
    if "video" not in columns:
        raise ValueError(f"{csv_path}: no 'video' column (has {columns})")
    for row in rows:
        if row["video"] and not Path(row["video"]).is_absolute():
            row["video"] = str((csv_path.parent / row["video"]).resolve())
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return out_path
