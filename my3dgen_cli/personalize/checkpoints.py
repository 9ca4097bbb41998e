"""Training checkpoints (`checkpoints/step-NNNNNN.pt`): the file (`TrainingCheckpoint`, its reader and
writer) and what the training loop does with them (keep the newest, resume from the newest).

A checkpoint holds the trainable tensors, Adam's state, the step, the batch generator's state and the
loss log, so a resumed run equals an uninterrupted one bit for bit (same device). It is read with
`weights_only`, so loading one never runs code.
"""

from __future__ import annotations

import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from my3dgen_cli.errors import UserInputError, reason, shown
from my3dgen_cli.fileio import atomic_path
from my3dgen_cli.optim import Adam

CHECKPOINT_FORMAT = "my3dgen-train-checkpoint/1"
KEEP_CHECKPOINTS = 2


def checkpoint_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("step-*.pt")) if folder.is_dir() else []


@dataclass
class TrainingCheckpoint:
    """What a training checkpoint (`checkpoints/step-NNNNNN.pt`, `CHECKPOINT_FORMAT`) holds: the step, the
    trainable tensors (CPU), Adam's state, the batch generator's state, the loss log, the settings a
    resumed run must share (`fingerprint`) and, for fp16, the loss scaler's state."""

    step: int
    params: list[torch.Tensor]
    optimizer: dict[str, Any]
    rng: torch.Tensor
    log: list[dict[str, float]]
    fingerprint: dict[str, Any]
    scaler: dict[str, Any] | None = None


def write_training_checkpoint(path: Path, ckpt: TrainingCheckpoint) -> Path:
    """Write `ckpt` atomically (torch.save of plain tensors, dicts and numbers: read with weights_only)."""
    state = {"format": CHECKPOINT_FORMAT, "step": ckpt.step, "params": ckpt.params, "optimizer": ckpt.optimizer,
             "rng": ckpt.rng, "log": ckpt.log, "fingerprint": ckpt.fingerprint}
    if ckpt.scaler is not None:
        state["scaler"] = ckpt.scaler
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


# Each entry's expected type (the tensors of "params" are checked one by one).
_CHECKPOINT_TYPES = {"step": int, "params": list, "optimizer": dict, "rng": torch.Tensor, "log": list,
                     "fingerprint": dict}


def read_training_checkpoint(path: Path) -> TrainingCheckpoint:
    """A training checkpoint, checked: readable without running code (weights_only), format tag, every entry
    of its type, params float and finite. Anything else is one line saying how to start over."""
    again = "; pass --force instead of --resume to start over"
    try:
        with warnings.catch_warnings():  # torch warns about what it refuses; the refusal below says it once
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # torch's text would advise weights_only=False: never passed on
        if "GLOBAL" in str(err):  # a class or function weights_only will not build ("unsupported GLOBAL ...")
            raise UserInputError(f"{path}: not a training checkpoint (it holds objects other than tensors and "
                                 f"numbers; refused without running them){again}") from None
        raise UserInputError(f"{path}: not a readable training checkpoint (damaged, or not a PyTorch file)"
                             f"{again}") from None
    except Exception as err:  # noqa: BLE001  torch raises zip and runtime errors for a damaged file
        raise UserInputError(f"{path}: not a readable training checkpoint ({reason(err)}){again}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise UserInputError(f"{path}: got format {shown(got)}, expected {CHECKPOINT_FORMAT!r}{again}")
    for key, kind in _CHECKPOINT_TYPES.items():
        if not isinstance(state.get(key), kind) or (kind is int and isinstance(state.get(key), bool)):
            raise UserInputError(f"{path}: {key} is a {type(state.get(key)).__name__}, expected a "
                                 f"{kind.__name__}{again}")
    scaler = state.get("scaler")
    if scaler is not None and not isinstance(scaler, dict):
        raise UserInputError(f"{path}: scaler is a {type(scaler).__name__}, expected a dict{again}")
    for k, t in enumerate(state["params"]):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise UserInputError(f"{path}: trainable tensor {k} is not finite floating point{again}")
    return TrainingCheckpoint(state["step"], state["params"], state["optimizer"], state["rng"], state["log"],
                              state["fingerprint"], scaler)


def keep_checkpoint(folder: Path, step: int, params: list[nn.Parameter], opt: Adam,
                    rng: torch.Generator, log: list[dict[str, float]], fingerprint: dict[str, Any],
                    scaler: torch.amp.GradScaler | None = None) -> Path:
    """Write step-NNNNNN.pt (fp16: with the loss scale) and keep the newest KEEP_CHECKPOINTS."""
    ckpt = TrainingCheckpoint(step, [p.detach().cpu().clone() for p in params], opt.state_dict(), rng.get_state(),
                              log, fingerprint, scaler.state_dict() if scaler is not None and scaler.is_enabled()
                              else None)
    path = write_training_checkpoint(folder / f"step-{step:06d}.pt", ckpt)
    for old in checkpoint_files(folder)[:-KEEP_CHECKPOINTS]:
        old.unlink(missing_ok=True)
    return path


def resume_checkpoint(folder: Path, fingerprint: dict[str, Any]) -> TrainingCheckpoint | None:
    """The newest checkpoint in `folder` (None if there is none); refuses one from other settings."""
    files = checkpoint_files(folder)
    if not files:
        return None
    ckpt = read_training_checkpoint(files[-1])
    saved = ckpt.fingerprint
    if "train_extras" in fingerprint:  # a checkpoint older than the option trained the LoRA factors only
        saved = {"train_extras": False, **saved}
    if "anchor_batch" in fingerprint:  # older checkpoints' anchors came in chunks of 4
        saved = {"anchor_batch": 4, **saved}
    for key in sorted(set(saved) | set(fingerprint)):
        if saved.get(key) != fingerprint.get(key):
            raise UserInputError(f"--resume: the checkpoint was made with {key}={saved.get(key)!r}, "
                                 f"this run has {key}={fingerprint.get(key)!r}; rerun with the same settings")
    return ckpt
