"""What the training loop reports: hooks, the loss log, live plots and sample previews.

The `Trainer` calls every callback on rank 0 only. `LossHistory`, `LossCsv` (and, under msrun,
`StepTimesCsv`) are always installed; `LiveLossPlot` and `SampleCallback` are the notebook's.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from opensora.checkpoint import atomic_write, load_checkpoint
from opensora.data.video import to_uint8_frames, write_video
from opensora.train.sampling import decode_latents, sample_latents

if TYPE_CHECKING:  # annotations only: the trainer imports this module
    from opensora.train.trainer import Trainer


LOSS_COLUMNS = ("step", "loss", "seconds", "epoch")


def read_loss_csv(path: str | os.PathLike) -> list[dict[str, float]]:
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def _truncate_csv(path: Path, last_step: int) -> None:
    """Keep the header and the rows up to `last_step` of a per-step log (first column: step);
    a killed run may have logged past its checkpoint."""
    if not path.is_file():
        return
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return
    kept = [r for r in rows[1:] if r and float(r[0]) <= last_step]
    with atomic_write(path, "w") as handle:
        csv.writer(handle).writerows([rows[0], *kept])


@dataclass
class StepRecord:
    step: int
    loss: float
    seconds: float  # wall time of this step, data loading excluded
    data_seconds: float  # time spent waiting for this batch
    epoch: int
    rank_seconds: tuple[float, ...] = ()  # every rank's step time under msrun; () alone


class Callback:
    """Hooks the Trainer calls; override the ones you need."""

    def on_train_start(self, trainer: Trainer, start_step: int) -> None: ...

    def on_step_end(self, trainer: Trainer, record: StepRecord) -> None: ...

    def on_checkpoint(self, trainer: Trainer, step: int, folder: Path) -> None: ...

    def on_train_end(self, trainer: Trainer) -> None: ...


@dataclass
class LossHistory(Callback):
    """Keeps every StepRecord (the loss curve and step times)."""

    records: list[StepRecord] = field(default_factory=list)

    def on_step_end(self, trainer: Trainer, record: StepRecord) -> None:
        self.records.append(record)

    @property
    def losses(self) -> list[float]:
        return [r.loss for r in self.records]

    def steps_per_second(self, skip: int = 1) -> float:
        """Optimizer steps per second, ignoring the first `skip` (compilation, warm-up)."""
        times = [r.seconds for r in self.records[skip:]] or [r.seconds for r in self.records]
        return len(times) / max(sum(times), 1e-9)


class StepCsv(Callback):
    """A per-step csv log that continues across every run of a job.

    A resumed run first drops the rows a killed run logged past its checkpoint, so the file
    always continues from the step training resumes at. Rows are appended and flushed one at
    a time: a crash loses at most the row being written. Subclasses give the header and a row."""

    def __init__(self, path: str | os.PathLike, header: Sequence[str]):
        self.path = Path(path)
        self.header = list(header)

    def row(self, record: StepRecord) -> list[Any]:
        raise NotImplementedError

    def on_train_start(self, trainer: Trainer, start_step: int) -> None:
        _truncate_csv(self.path, start_step)
        if not self.path.is_file() or self.path.stat().st_size == 0:
            _append_row(self.path, self.header)

    def on_step_end(self, trainer: Trainer, record: StepRecord) -> None:
        _append_row(self.path, self.row(record))


class LossCsv(StepCsv):
    """`loss.csv`: step, loss, seconds, epoch."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path, LOSS_COLUMNS)

    def row(self, record: StepRecord) -> list[Any]:
        return [record.step, repr(record.loss), f"{record.seconds:.4f}", record.epoch]


class StepTimesCsv(StepCsv):
    """`step_times.csv` under msrun: every rank's time per step (synchronous data parallelism
    runs at the pace of the slowest rank)."""

    def __init__(self, path: str | os.PathLike, world_size: int):
        super().__init__(path, ["step", *(f"rank_{r}" for r in range(int(world_size)))])

    def row(self, record: StepRecord) -> list[Any]:
        return [record.step, *(f"{t:.4f}" for t in record.rank_seconds)]


def _append_row(path: Path, row: Sequence[Any]) -> None:
    with path.open("a", newline="") as handle:
        csv.writer(handle).writerow(row)


def plot_loss(steps: Sequence[float], losses: Sequence[float], ax: Any = None,
              smooth: int = 20, title: str = "training loss") -> Any:
    """Raw loss and its running mean over `smooth` steps, on a log scale."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3))
    ax.clear()
    ax.plot(steps, losses, lw=0.6, alpha=0.4, label="loss")
    if len(losses) >= 2:
        window = max(1, min(smooth, len(losses) // 2))
        kernel = np.ones(window) / window
        smoothed = np.convolve(np.asarray(losses, np.float64), kernel, mode="valid")
        ax.plot(list(steps)[window - 1:], smoothed, lw=1.5, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if len(losses) and min(losses) > 0:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.figure.tight_layout()
    return ax.figure


class LiveLossPlot(Callback):
    """Redraws the loss curve in place every `every` steps in an interactive notebook; in a
    headless run (papermill) it draws once at the end, so the output holds one final figure."""

    def __init__(self, every: int = 10, interactive: bool | None = None, smooth: int = 20):
        self.every = max(1, int(every))
        self.smooth = smooth
        self.interactive = _is_interactive() if interactive is None else interactive
        self.steps: list[int] = []
        self.losses: list[float] = []
        self._handle = None
        self._fig = None

    def on_train_start(self, trainer: Trainer, start_step: int) -> None:
        for row in read_loss_csv(trainer.loss_csv):
            if row["step"] <= start_step:
                self.steps.append(int(row["step"]))
                self.losses.append(row["loss"])

    def on_step_end(self, trainer: Trainer, record: StepRecord) -> None:
        self.steps.append(record.step)
        self.losses.append(record.loss)
        if self.interactive and record.step % self.every == 0:
            self._draw()

    def on_train_end(self, trainer: Trainer) -> None:
        self._draw()

    def _draw(self) -> None:
        import matplotlib.pyplot as plt
        from IPython.display import display

        if self._fig is None:
            self._fig, _ = plt.subplots(figsize=(6, 3))
            plt.close(self._fig)  # shown through the display handle, not by the backend
        plot_loss(self.steps, self.losses, self._fig.axes[0], self.smooth)
        if self._handle is None:
            self._handle = display(self._fig, display_id=True)
        else:
            self._handle.update(self._fig)

    @property
    def figure(self) -> Any:
        return self._fig


def _is_interactive() -> bool:
    """True inside a live Jupyter kernel with a front end; False under papermill / scripts."""
    if os.environ.get("PAPERMILL_EXECUTION") or os.environ.get("OPENSORA_HEADLESS"):
        return False
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:
        return False
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell" and \
        "papermill" not in str(getattr(shell, "parent_header", {}))


class SampleCallback(Callback):
    """Every `every` steps (and at the end), sample one clip per caption embedding and write
    them as GIFs under output_dir/samples/step_NNNNNN/; `self.samples` maps step -> clips."""

    def __init__(self, every: int, y: np.ndarray, mask: np.ndarray, captions: Sequence[str],
                 vae: Any, latent_shape: Sequence[int], image_size: tuple[int, int],
                 fps: float = 8, num_sampling_steps: int = 25, cfg_scale: float = 4.0,
                 seed: int = 0, use_ema: bool = True,
                 on_samples: Callable[[int, np.ndarray, Sequence[str]], None] | None = None,
                 graph: bool = False, noise_schedule: str = "linear"):
        self.every = int(every)
        self.graph = graph
        self.noise_schedule = noise_schedule
        self.y, self.mask, self.captions = y, mask, list(captions)
        self.vae = vae
        self.latent_shape = tuple(latent_shape)
        self.image_size = tuple(image_size)
        self.fps = fps
        self.num_sampling_steps = num_sampling_steps
        self.cfg_scale = cfg_scale
        self.seed = seed
        self.use_ema = use_ema
        self.on_samples = on_samples
        self.samples: dict[int, np.ndarray] = {}

    def on_step_end(self, trainer: Trainer, record: StepRecord) -> None:
        if self.every > 0 and record.step % self.every == 0:
            self.run(trainer, record.step)

    def on_train_end(self, trainer: Trainer) -> None:
        if trainer.step not in self.samples:
            self.run(trainer, trainer.step)

    def run(self, trainer: Trainer, step: int) -> np.ndarray:
        model = trainer.train_step.model
        saved = None
        ema = trainer.train_step.ema
        if self.use_ema and ema is not None:
            saved = {n: p.asnumpy() for n, p in model.parameters_and_names()}
            load_checkpoint(model, ema.state_dict(model), strict=True)
        try:
            latents = sample_latents(model, self.y, self.mask, self.latent_shape,
                                     self.image_size, self.fps, self.num_sampling_steps,
                                     self.cfg_scale, self.seed, graph=self.graph,
                                     noise_schedule=self.noise_schedule)
        finally:
            if saved is not None:
                load_checkpoint(model, saved, strict=True)
        clips = decode_latents(self.vae, latents)
        folder = trainer.output_dir / "samples" / f"step_{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, clip in enumerate(clips):
            write_video(folder / f"sample_{i:02d}.gif", to_uint8_frames(clip), self.fps)
        (folder / "captions.txt").write_text("".join(c + "\n" for c in self.captions))
        self.samples[step] = clips
        if self.on_samples is not None:
            self.on_samples(step, clips, self.captions)
        return clips
