"""Know the cost before a long run: time a few real steps and project the whole run's duration.

Before the anchors are projected, `personalize` (CLI) runs two projection steps on the first chunk of
photos and three training steps (two with --no-sym) on a copy of the generator, and prints what the
whole run will take (`--no-estimate`, PersonalizeConfig(estimate=False), skips all of it). Both are
thrown away, and neither changes the run's result: a projection starts at w_avg and draws no random
numbers, and the training copy has its own adapters, optimizer and seeded generators
(tests/test_personalize_estimate.py checks the adapter bit for bit against a run without the estimate).
"""

from __future__ import annotations

import contextvars
import copy
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from my3dgen_cli.identity import IdentityPaths
from my3dgen_cli.personalize.config import PersonalizeConfig, TrainConfig

LONG_RUN_S = 3600.0  # a CPU run longer than this gets the "what helps" advice
_IN_TRIAL = contextvars.ContextVar("my3dgen_estimate_trial", default=False)


def in_trial() -> bool:
    """True while the estimate's timing steps run (code that counts a run's projections or steps skips them)."""
    return _IN_TRIAL.get()


@contextmanager
def _trial() -> Iterator[None]:
    token = _IN_TRIAL.set(True)
    try:
        yield
    finally:
        _IN_TRIAL.reset(token)


@dataclass(frozen=True)
class Estimate:
    """Measured seconds per step and the projected seconds of each stage still to run."""

    device: str
    photos: int
    anchor_steps: int  # projection steps per chunk still to run (0: anchors reused or given)
    anchor_chunks: int
    anchor_step_s: float
    anchors_s: float
    train_steps: int  # training steps still to run
    train_step_s: float
    sym_step_s: float  # a step with the symmetry term
    training_s: float

    @property
    def total_s(self) -> float:
        return self.anchors_s + self.training_s

    def to_dict(self) -> dict[str, float | int | str]:
        d = asdict(self)
        d["total_s"] = self.total_s
        return d

    def line(self) -> str:
        """One line: what each stage will take and why (counts x seconds per step)."""
        parts = []
        if self.anchor_steps:
            parts.append(f"anchors: ~{duration(self.anchors_s)} ({self.photos} photos in {self.anchor_chunks} "
                         f"chunk(s) x {self.anchor_steps} steps at {self.anchor_step_s:.2f} s/step)")
        parts.append(f"training: ~{duration(self.training_s)} ({self.train_steps} steps at "
                     f"{self.train_step_s:.2f} s/step, {self.sym_step_s:.2f} s with the symmetry term)")
        return "estimate: " + ", ".join(parts) + f"; total ~{duration(self.total_s)} on {self.device}"

    def cpu_advice(self) -> str | None:
        """The CPU warning with the measured figure; None off the CPU."""
        if self.device != "cpu":
            return None
        if self.total_s >= LONG_RUN_S:
            return (f"on the CPU this run takes about {duration(self.total_s)} ({self.train_step_s:.2f} s per "
                    "training step measured); `--budget quick` (300/100 steps) or a GPU (--device cuda or mps) "
                    "makes it much shorter")
        return (f"training on the CPU: {self.train_step_s:.2f} s per step measured; "
                "a GPU (--device cuda or mps) is much faster")


def duration(seconds: float) -> str:
    """12 s, 7 min, 3.4 hours: the unit a person reads at a glance."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} hours"


def _step_times(run: Callable[[Callable[..., None]], Any], steps: int) -> list[float]:
    """Seconds of each of `steps` steps of `run(on_step)`. on_step is called after each step's host sync
    (the loss read back), so a step's time includes its device work."""
    marks = [time.perf_counter()]

    def on_step(*_: object) -> None:
        marks.append(time.perf_counter())

    run(on_step)
    return [b - a for a, b in zip(marks, marks[1:], strict=False)][:steps]


def time_projection_step(G: nn.Module, images: torch.Tensor, cameras: torch.Tensor, config: PersonalizeConfig,
                         lpips: nn.Module | None) -> float:
    """Seconds of one projection step of a chunk (the second of two, after warm-up); G is not changed."""
    from my3dgen_cli.personalize import anchors

    chunk = config.anchor_batch
    with _trial():
        times = _step_times(lambda on_step: anchors.project_to_w(
            G, images[:chunk], cameras[:chunk], 2, space=config.anchor_space, lr=config.anchor_lr, lpips=lpips,
            batch=chunk, on_step=on_step), 2)
    return times[-1]


def time_training_steps(G: nn.Module, images: torch.Tensor, cameras: torch.Tensor, ws: torch.Tensor,
                        config: TrainConfig, lpips: nn.Module | None, sym_distance: Any) -> tuple[float, float]:
    """(seconds of a plain training step, of a step with the symmetry term), on a copy of G.

    Three steps with the symmetry term on steps 1 and 3: step 1 warms up, step 2 is plain, step 3
    has the term. Without symmetry two steps do (warm-up, plain), and a step with the term costs what
    a plain one does. No checkpoint, no compile (that would time the compiler). The copy costs little
    beside the steps (tiny config: ~9 ms of ~0.7 s; full size on a CPU: ~0.1 s of several seconds per step).
    """
    from my3dgen_cli.personalize.training import TrainingInterrupted, train_adapter

    steps = 3 if config.sym else 2
    trial = replace(config, steps=steps, sym_every=2, checkpoint_every=0, compile=False)
    try:
        with _trial():
            times = _step_times(lambda on_step: train_adapter(copy.deepcopy(G), images, cameras, ws, trial, lpips=lpips,
                                                              sym_distance=sym_distance, on_step=on_step), steps)
    except TrainingInterrupted:  # Ctrl-C in the trial: not the run's training, so no "step N" or checkpoint to name
        raise KeyboardInterrupt from None
    plain = times[1]
    return plain, (times[2] if config.sym else plain)


def estimate_run(device: torch.device, photos: int, anchor_steps: int, anchor_step_s: float, train: TrainConfig,
                 train_steps: int, step_s: tuple[float, float], anchor_batch: int = 4) -> Estimate:
    """The projected duration of `anchor_steps` per chunk (of `anchor_batch` photos) and `train_steps` steps."""
    chunks = math.ceil(photos / anchor_batch) if anchor_steps else 0
    plain, with_sym = step_s
    sym_steps = math.ceil(train_steps / train.sym_every) if train.sym else 0
    training = train_steps * plain + sym_steps * max(with_sym - plain, 0.0)
    return Estimate(device.type, photos, anchor_steps, chunks, anchor_step_s, chunks * anchor_steps * anchor_step_s,
                    train_steps, plain, with_sym, training)


def measure_run(G: nn.Module, images: torch.Tensor, cameras: torch.Tensor, config: PersonalizeConfig, nets: Any,
                sym_distance: Any, build: IdentityPaths, *, needs_anchors: bool, resume: bool) -> Estimate:
    """Time what is still to run of a personalization into the build folder `build` and project its duration.

    needs_anchors: the photos still have to be projected (False: a dataset's latents or saved anchors);
    resume: photos already in the partial-anchors file and steps already in a training checkpoint
    are not counted.
    """
    from my3dgen_cli.identity import read_partial_anchors
    from my3dgen_cli.personalize.checkpoints import checkpoint_files

    n = images.shape[0]
    photos_left = n if needs_anchors else 0
    partial = read_partial_anchors(build.partial_anchors) if resume and photos_left else None
    if partial is not None:
        photos_left = max(n - partial.ws.shape[0], 0)
    anchor_steps = config.anchor_steps if photos_left else 0
    anchor_s = time_projection_step(G, images, cameras, config, nets.anchor_lpips) if anchor_steps else 0.0
    saved = checkpoint_files(build.checkpoints) if resume else []
    done = int(saved[-1].stem.split("-")[1]) if saved else 0
    train = config.train_config()
    steps_left = max(config.steps - done, 0)
    step_s = (0.0, 0.0)
    if steps_left:
        w_avg = G.backbone.mapping.w_avg.detach().to(images.device)
        ws = w_avg.reshape(1, 1, -1).expand(n, G.num_ws, -1)
        step_s = time_training_steps(G, images, cameras, ws, train, nets.train_lpips, sym_distance)
    return estimate_run(images.device, photos_left, anchor_steps, anchor_s, train, steps_left, step_s,
                        config.anchor_batch)
