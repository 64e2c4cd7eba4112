"""Figures and inline media for the book: frame grids, strips, inline videos, scrubbers, curves.

Everything returns a matplotlib Figure or an IPython display object, so a notebook shows it
inline, the built book embeds it, and a job can save it.
"""

from __future__ import annotations

import base64
import io
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import FancyArrowPatch, Rectangle
from PIL import Image

from opensora.checkpoint import atomic_write
from opensora.data.video import to_uint8_frames, write_video


def _as_uint8_frames(video: np.ndarray) -> np.ndarray:
    """Accept (T, H, W, C) uint8 or (C, T, H, W) float in [-1, 1]."""
    video = np.asarray(video)
    if video.dtype == np.uint8:
        return video

    return to_uint8_frames(video)


def frame_grid(clips: Sequence[np.ndarray], captions: Sequence[str] | None = None,
               frames_per_clip: int = 4, cell_inches: float = 1.3,
               title: str | None = None) -> plt.Figure:
    """One row per clip, `frames_per_clip` evenly spaced frames across, caption on the left."""
    rows = len(clips)
    fig, axes = plt.subplots(rows, frames_per_clip, squeeze=False,
                             figsize=(cell_inches * frames_per_clip + 2.6, cell_inches * rows))
    for r, clip in enumerate(clips):
        frames = _as_uint8_frames(clip)
        picks = np.linspace(0, len(frames) - 1, frames_per_clip).round().astype(int)
        for c, index in enumerate(picks):
            ax = axes[r][c]
            ax.imshow(frames[index])
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"frame {index}", fontsize=8)
        if captions is not None:
            axes[r][0].set_ylabel(_wrap(captions[r], 28), rotation=0, ha="right", va="center",
                                  fontsize=7, labelpad=6)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def frame_strip(frames: np.ndarray, indices: Sequence[int] | None = None,
                labels: Sequence[str] | None = None, cell_inches: float = 1.1,
                ax_title: str | None = None) -> plt.Figure:
    """Frames side by side (all of them, or `indices`), each labelled."""
    frames = _as_uint8_frames(frames)
    indices = list(range(len(frames))) if indices is None else list(indices)
    fig, axes = plt.subplots(1, len(indices), squeeze=False,
                             figsize=(cell_inches * len(indices), cell_inches + 0.4))
    for i, index in enumerate(indices):
        ax = axes[0][i]
        ax.imshow(frames[index])
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(labels[i] if labels else str(index), fontsize=7)
    if ax_title:
        fig.suptitle(ax_title, fontsize=9)
    fig.tight_layout()
    return fig


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])


def video_bytes(video: np.ndarray, fps: float = 8, fmt: str = "mp4") -> bytes:
    """Encode frames to mp4 or gif bytes (through the package's writer)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = write_video(Path(tmp) / f"clip.{fmt}", _as_uint8_frames(video), fps)
        return path.read_bytes()


def video_html(video: np.ndarray, fps: float = 8, width: int = 192, fmt: str = "gif",
               caption: str | None = None):
    """An inline video that survives into the static book (base64, no external file).

    GIF is the default because every browser plays it without controls or codecs; mp4 is
    smaller for long clips.
    """
    from IPython.display import HTML

    data = base64.b64encode(video_bytes(video, fps, fmt)).decode()
    if fmt == "gif":
        media = f'<img src="data:image/gif;base64,{data}" width="{width}" />'
    else:
        media = (f'<video width="{width}" controls autoplay loop muted playsinline '
                 f'src="data:video/mp4;base64,{data}"></video>')
    label = f'<figcaption style="font-size:small">{caption}</figcaption>' if caption else ""
    return HTML(f'<figure style="display:inline-block;margin:4px">{media}{label}</figure>')


def videos_html(videos: Sequence[np.ndarray], captions: Sequence[str] | None = None,
                fps: float = 8, width: int = 160, fmt: str = "gif"):
    """Several inline videos side by side."""
    from IPython.display import HTML

    parts = [video_html(v, fps, width, fmt, captions[i] if captions else None).data
             for i, v in enumerate(videos)]
    return HTML("<div>" + "".join(parts) + "</div>")


def frame_scrubber(video: np.ndarray, description: str = "frame"):
    """A slider that shows one frame at a time; a static first frame is drawn too, so the figure
    exists when the notebook runs headless or in the static book."""
    frames = _as_uint8_frames(video)
    return image_slider(frames, list(range(len(frames))), description)


def _png(frame: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).resize((frame.shape[1] * 3, frame.shape[0] * 3),
                                  Image.NEAREST).save(buffer, format="PNG")
    return buffer.getvalue()


def save_figure(fig: plt.Figure, path: str | Path, dpi: int = 120) -> Path:
    """Save a figure atomically (a job's outputs are never half written)."""
    path = Path(path)
    with atomic_write(path) as handle:
        fig.savefig(handle, dpi=dpi, format=path.suffix.lstrip(".") or "png",
                    bbox_inches="tight")
    return path


def image_slider(frames: np.ndarray, labels: Sequence[Any], description: str = "frame"):
    """A slider over `labels` that shows the matching frame of `frames` ((N, H, W, 3) uint8);
    headless, the first frame is what the page shows."""
    import ipywidgets as widgets  # notebooks only

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4:
        raise ValueError(f"frames must be (N, H, W, 3) uint8, got {frames.dtype} {frames.shape}")
    labels = list(labels)
    if len(labels) != len(frames):
        raise ValueError(f"{len(labels)} labels for {len(frames)} frames")
    slider = widgets.SelectionSlider(options=labels, value=labels[0], description=description)
    image = widgets.Image(value=_png(frames[0]), format="png", width=192)

    def update(change: dict) -> None:
        image.value = _png(frames[labels.index(change["new"])])

    slider.observe(update, names="value")
    return widgets.VBox([slider, image])


def draw_data_parallel(ax: Any, title: str, state_sharded: bool, workers: int = 2) -> None:
    """Boxes of what each data-parallel worker holds (weights, its batch slice, averaged
    gradients, AdamW state whole or sharded) and the collectives between them."""
    width = 10 / workers
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 6.5)
    ax.axis("off")
    ax.set_title(title)

    def box(x: float, y: float, w: float, colour: str, alpha: float, text: str) -> None:
        ax.add_patch(Rectangle((x, y), w, 0.9, color=colour, alpha=alpha))
        ax.text(x + w / 2, y + 0.45, text, ha="center", va="center", fontsize=8)

    for rank in range(workers):
        x0, inner = 0.5 + width * rank, width - 1.0
        ax.add_patch(Rectangle((x0, 0.5), inner, 5.2, fill=False, lw=1.5))
        ax.text(x0 + inner / 2, 5.95, f"worker {rank}", ha="center")
        box(x0 + 0.3, 4.3, inner - 0.6, "C2", 0.5, "weights (full copy)")
        box(x0 + 0.3, 3.1, inner - 0.6, f"C{rank % 2}", 0.5,
            f"batch slice {rank}: clips {rank}, {rank + workers}, ...")
        box(x0 + 0.3, 1.9, inner - 0.6, "C4", 0.4, "gradients (full, averaged)")
        if state_sharded:
            share = (inner - 0.6) / workers
            ax.add_patch(Rectangle((x0 + 0.3 + share * rank, 0.7), share, 0.9, color="C3",
                                   alpha=0.6))
            ax.text(x0 + inner / 2, 1.15, f"AdamW state, part {rank}", ha="center",
                    va="center", fontsize=8)
        else:
            box(x0 + 0.3, 0.7, inner - 0.6, "C3", 0.6, "AdamW state (full)")
    for rank in range(workers - 1):
        gap = width * (rank + 1)  # the middle of the space between two workers
        arrows = [(2.35, "AllReduce")] + ([(4.75, "broadcast owned")] if state_sharded else [])
        for y, text in arrows:
            ax.add_patch(FancyArrowPatch((gap - 0.7, y), (gap + 0.7, y), arrowstyle="<->",
                                         mutation_scale=15))
            ax.text(gap, y + 0.35, text, ha="center", fontsize=8)
