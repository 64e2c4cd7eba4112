"""Training checkpoints: written atomically, verified whole before anything is applied.

`save_checkpoint` writes `output_dir/checkpoints/step_NNNNNN/` (model, optimizer moments, EMA,
state.json) into a temporary folder renamed into place, keeping the last `keep_last`.
`restore_latest` resumes from the newest checkpoint that reads back whole and falls back past
corrupt ones with a warning. `export_pretrained` writes the layout of the published Open-Sora
1.1 checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from mindspore import nn

from opensora.checkpoint import (
    CheckpointError,
    atomic_write,
    load_checkpoint,
    read_state_dict,
    save_state_dict,
)
from opensora.train.step import TrainStep

CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors", "state.json")


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """Finished checkpoints under output_dir/checkpoints, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")
             and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def save_checkpoint(output_dir: str | os.PathLike, step: int, train_step: TrainStep,
                    extra: Mapping[str, Any] | None = None, keep_last: int | None = 3,
                    optimizer_state: Mapping[str, np.ndarray] | None = None) -> Path:
    """Write step_NNNNNN/ atomically (a temp folder renamed into place) and prune old ones."""
    root = Path(output_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_state_dict(train_step.model, tmp / "model.safetensors")
    save_state_dict(dict(optimizer_state) if optimizer_state is not None
                    else train_step.optimizer_state(), tmp / "optimizer.safetensors")
    if train_step.ema is not None:
        save_state_dict(train_step.ema.state_dict(train_step.model), tmp / "ema.safetensors")
    state = {"step": int(step), **(dict(extra) if extra else {})}
    if hasattr(train_step.model, "config"):
        state["model_config"] = train_step.model.config
    with atomic_write(tmp / "state.json", "w") as handle:
        json.dump(state, handle, indent=1)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep_last:
        for old in checkpoint_dirs(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_training_checkpoint(folder: str | os.PathLike, train_step: TrainStep) -> dict[str, Any]:
    """Restore model, optimizer and EMA from one checkpoint folder; returns its state.json.

    Everything is read and checked before anything is changed, so a corrupt checkpoint
    raises CheckpointError and leaves the model as it was.
    """
    folder = Path(folder)
    try:
        state = json.loads((folder / "state.json").read_text())
        model_state = read_state_dict(folder / "model.safetensors")
        optim_state = read_state_dict(folder / "optimizer.safetensors")
        ema_state = (read_state_dict(folder / "ema.safetensors")
                     if train_step.ema is not None else None)
    except (OSError, ValueError, CheckpointError) as exc:
        raise CheckpointError(f"{folder}: unreadable checkpoint ({exc})") from exc
    if "step" not in state:
        raise CheckpointError(f"{folder}/state.json has no step")
    load_checkpoint(train_step.model, model_state, strict=True)
    train_step.load_optimizer_state(optim_state)
    if ema_state is not None:
        train_step.ema.load_state_dict(ema_state)
    return state


def restore_latest(output_dir: str | os.PathLike, train_step: TrainStep) -> tuple[int, Path | None]:
    """Resume from the newest checkpoint that loads; warn about and skip corrupt ones."""
    for folder in reversed(checkpoint_dirs(output_dir)):
        try:
            state = load_training_checkpoint(folder, train_step)
        except CheckpointError as exc:
            warnings.warn(f"checkpoint {folder.name} is corrupt, falling back to the previous "
                          f"one: {str(exc).splitlines()[0]}", stacklevel=2)
            continue
        return int(state["step"]), folder
    return 0, None


def export_pretrained(model: nn.Cell, folder: str | os.PathLike,
                      state: Mapping[str, np.ndarray] | None = None) -> Path:
    """Write `folder/config.json` + `folder/model.safetensors` (the layout of
    hpcai-tech/OpenSora-STDiT-v2-stage3), loadable with `STDiT2.from_pretrained`; `state`
    (e.g. the EMA weights) replaces the model's own."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_state_dict(dict(state) if state is not None else model, folder / "model.safetensors")
    config = dict(getattr(model, "config", {}))
    with atomic_write(folder / "config.json", "w") as handle:
        json.dump(config, handle, indent=1)
    return folder
