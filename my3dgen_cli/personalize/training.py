"""Adapter training (My3DGen's personalization step) with exact, resumable checkpoints.

Per step, for a batch of anchors (photo, camera, anchor latent w):
    loss = MSE(raw render, photo at the neural resolution) + MSE(image, photo)
         + LPIPS(raw render, photo at neural res.) + LPIPS(image, photo)     (LPIPS when available)
and every `sym_every` steps the symmetry term (symmetry.py) for one anchor latent at a random yaw.
Adam(lr, betas) on the adapter: the LoRA factors and, with `train_extras` (My3DGen's set, the default),
the biases, noise strengths and b4.const, whose base values are kept aside (lora.add_extras); the
other base weights never change.

Reproducibility: batches and symmetry yaws come from one explicit CPU `torch.Generator`; rendering
is deterministic. A checkpoint holds the trainable tensors, Adam's state, the step, that generator's
state and the loss log, so a resumed run equals an uninterrupted one bit for bit (same device).
"""

from __future__ import annotations

import functools
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from my3dgen_cli.eg3d import ops
from my3dgen_cli.eg3d.camera import camera_rig
from my3dgen_cli.errors import My3DGenError, UserInputError
from my3dgen_cli.optim import Adam
from my3dgen_cli.personalize import twin
from my3dgen_cli.personalize.anchors import perceptual_distance, resize
from my3dgen_cli.personalize.checkpoints import keep_checkpoint, resume_checkpoint
from my3dgen_cli.personalize.config import PersonalizeConfig, TrainConfig
from my3dgen_cli.personalize.distributed import SINGLE, Dist, fault_hook, reduce_sum, shard, sum_gradients
from my3dgen_cli.personalize.symmetry import SymmetryDistance, mse_distance, symmetry_cameras, symmetry_loss
from my3dgen_cli.speed import (
    activation_checkpointing,
    add_gradients,
    autocast,
    check_amp,
    cpu_workers,
    one_thread_each,
    run_parallel,
    use_channels_last,
)


class TrainingInterrupted(My3DGenError):
    """Ctrl-C (or a callback's KeyboardInterrupt) during training; a checkpoint was saved."""

    exit_code = 130

    def __init__(self, step: int, path: Path | None) -> None:
        where = f"; checkpoint saved to {path}; run the same command with --resume to continue" if path else ""
        super().__init__(f"interrupted at step {step}{where}")
        self.step, self.path = step, path


@dataclass
class TrainResult:
    steps: int
    log: list[dict[str, float]]
    parameters: int
    seconds: float
    resumed_from: int = 0
    sym_kind: str | None = None
    checkpoints: list[Path] = field(default_factory=list)


def reconstruction_terms(out: dict[str, torch.Tensor], photo: torch.Tensor, photo_raw: torch.Tensor,
                         lpips: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
    """My3DGen's loss terms as tensors (no host sync): MSE and LPIPS, each summed over both resolutions.

    Each is a mean over the batch, so a batch split into shards weighted by their share sums back
    to the whole batch's value (what data parallelism and gradient accumulation rely on).
    """
    raw = out["image_raw"].float()
    image = out["image"].float()
    mse = F.mse_loss(raw, photo_raw) + F.mse_loss(image, photo)
    perc = perceptual_distance(lpips, raw, photo_raw) + perceptual_distance(lpips, image, photo, 512)
    return mse, perc


def reconstruction_loss(out: dict[str, torch.Tensor], photo: torch.Tensor, photo_raw: torch.Tensor,
                        lpips: nn.Module | None) -> tuple[torch.Tensor, dict[str, float]]:
    """My3DGen's loss: MSE + LPIPS at the neural resolution (image_raw, its rgb) and at full resolution."""
    mse, perc = reconstruction_terms(out, photo, photo_raw, lpips)
    return mse + perc, {"mse": float(mse.detach()), "lpips": float(perc.detach())}


def _forward(G: nn.Module, synth: Callable, ws: torch.Tensor, cameras: torch.Tensor, channels_last: bool,
             sym_cameras: torch.Tensor | None, distance: SymmetryDistance,
             ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """One chunk's renders, and with `sym_cameras` the symmetry term of its first latent (fp32).

    With the symmetry term the chunk's tri-planes are computed once and the mirrored views reuse the
    first latent's (the backbone does not see the camera), so a symmetry step runs the backbone for
    the batch only, and one backward covers both terms. Same values as separate passes up to float
    order (tests/test_train_speed.py measures it; ops.reference_paths() keeps the separate pass).
    """
    if sym_cameras is None:
        return synth(ws, cameras, noise_mode="const", sampling="deterministic", channels_last=channels_last), None
    planes = G.planes(ws, noise_mode="const", channels_last=channels_last)
    out = G.synthesis(ws, cameras, noise_mode="const", sampling="deterministic", channels_last=channels_last,
                      planes=planes)
    sym = symmetry_loss(G, ws[:1], sym_cameras, distance, channels_last=channels_last, planes=planes[:1])
    return out, sym.float()


def _sym_totals(weight: float, sym: torch.Tensor) -> torch.Tensor:
    """The symmetry term's row of a step's totals (loss, mse, lpips, sym)."""
    return torch.stack([weight * sym, sym.new_zeros(()), sym.new_zeros(()), sym]).detach()


@contextmanager
def _sigint_flag() -> Iterator[dict[str, bool]]:
    """Turn the first Ctrl-C into a flag checked between steps (a second one interrupts at once, except inside
    `_held`, where it waits for the block's end)."""
    flag = {"stop": False, "hold": False, "now": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag["stop"] and flag["hold"]:
            flag["now"] = True
        elif flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def _held(flag: dict[str, bool]) -> Iterator[None]:
    """A block that a second Ctrl-C does not cut: the optimizer's update and the step count change together, so
    the checkpoint an interrupt writes is a step boundary and --resume goes on exactly."""
    flag["hold"] = True
    try:
        yield
    finally:
        flag["hold"] = False
    if flag["now"]:
        raise KeyboardInterrupt


# --- the loop ----------------------------------------------------------------------------------


def train_adapter(
    G: nn.Module,
    images: torch.Tensor,
    cameras: torch.Tensor,
    anchors_ws: torch.Tensor,
    config: TrainConfig | PersonalizeConfig,
    *,
    lpips: nn.Module | None = None,
    sym_distance: SymmetryDistance | None = None,
    params: list[nn.Parameter] | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    raw_images: torch.Tensor | None = None,
    world: Dist = SINGLE,
) -> TrainResult:
    """Train LoRA adapters on G so it renders each photo from its camera and anchor latent.

    images: [N, 3, H, W] in [-1, 1]; cameras: [N, 25]; anchors_ws: [N, num_ws, w_dim]; all on G's
    device. config: a TrainConfig, or a PersonalizeConfig (its `train_config()` is used). Adapters (and, with
    train_extras, the trained extras: lora.EXTRA_TARGETS) are attached here unless
    `params` (the tensors to train, e.g. all synthesis weights for full fine-tuning) is given.
    sym_distance: the symmetry distance (None = pixel MSE). checkpoint_dir: where checkpoints go
    (every config.checkpoint_every steps and on interrupt); resume: continue from its newest one.
    on_step(step, record) runs after each completed step; a KeyboardInterrupt there (or Ctrl-C)
    saves a checkpoint and raises TrainingInterrupted. raw_images: targets of the raw neural render
    [N, 3, r, r] (default: `images` downsampled, as the paper; synthetic tests pass the true raw renders).

    Speed (TrainConfig fields): amp ("off"/"bf16"/"fp16" or a bool), accum (micro-batches
    per step: same effective batch, less memory), act_checkpointing, compile, channels_last (None =
    on with autocast on CUDA: speed.use_channels_last). world: data-parallel
    group (distributed.Dist): each rank trains its shard of every batch, the adapter gradients are
    summed over ranks (each shard's loss is weighted by its share of the batch, so the sum is the
    whole batch's gradient), the symmetry term runs on one rank per step (in turn), only rank 0
    writes checkpoints. Every rank gets the same data and config.
    """
    if not isinstance(config, TrainConfig):
        config = config.train_config()
    n = images.shape[0]
    if n == 0 or cameras.shape != (n, 25) or anchors_ws.shape[0] != n:
        raise ValueError(f"training data: got {n} images, cameras {tuple(cameras.shape)}, "
                         f"anchors {tuple(anchors_ws.shape)}, expected N >= 1, (N, 25), (N, num_ws, w_dim)")
    params = _trainable(G, config, params)
    n_params = sum(p.numel() for p in params)
    device = images.device
    amp = config.amp
    loop = _Loop(
        G=G, config=config, world=world, params=params, anchors_ws=anchors_ws, cameras=cameras, lpips=lpips,
        photo=resize(images, G.img_resolution),
        photo_raw=resize(images if raw_images is None else raw_images, G.neural_rendering_resolution),
        rng=torch.Generator().manual_seed(config.seed + 1),
        opt=Adam(params, lr=config.lr, betas=tuple(config.betas)),
        # fp16 keeps no gradient below ~6e-8: at 512 px the MSE gradient per pixel is about that small,
        # so fp16 scales the loss up (and the gradients back down before Adam); bf16 has fp32's range.
        scaler=torch.amp.GradScaler(device.type, enabled=check_amp(amp) == "fp16"),
        distance=sym_distance or mse_distance(),
        nhwc=use_channels_last(config.channels_last, device, amp),
        rig=camera_rig(G),  # symmetry views orbit the base's own pivot
    )
    if not config.compile and check_amp(amp) != "fp16":
        loop.workers = cpu_workers(device, -(-min(config.batch, n) // config.accum))
    fingerprint = {**config.resume_fingerprint(), "photos": n, "trainable": n_params}
    start, log = _resume(loop, checkpoint_dir, fingerprint) if resume and checkpoint_dir is not None else (0, [])
    saved: list[Path] = []
    t0 = time.perf_counter()
    G.train()
    step, step_start = start, None
    with _sigint_flag() as flag:  # kept while the interrupt's checkpoint is written, below
        try:
            with activation_checkpointing(G, config.act_checkpointing):
                while step < config.steps:
                    step_start = loop.rng.get_state()  # an interrupt before the update rewinds to here
                    work = _gradients(loop, step)
                    with _held(flag):
                        record = _update(loop, step, *work)
                        step += 1
                        log.append(record)
                        step_start = None
                    if (checkpoint_dir is not None and world.is_main and config.checkpoint_every
                            and step % config.checkpoint_every == 0):
                        saved.append(keep_checkpoint(checkpoint_dir, step, params, loop.opt, loop.rng, log,
                                                     fingerprint, loop.scaler))
                    fault_hook(step, world)
                    if on_step is not None:
                        on_step(step, record)
                    if flag["stop"]:
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            flag["stop"] = flag["hold"] = True  # one more Ctrl-C must not cut the checkpoint that lets the run resume
            path = None
            if step_start is not None:  # mid-step: the batch and cameras it drew are drawn again on --resume
                loop.rng.set_state(step_start)
            if checkpoint_dir is not None and world.is_main:
                path = keep_checkpoint(checkpoint_dir, step, params, loop.opt, loop.rng, log, fingerprint,
                                       loop.scaler)
            raise TrainingInterrupted(step, path) from None
        finally:
            _close_twins(loop)
            G.eval()
    return TrainResult(step, log, n_params, time.perf_counter() - t0, start,
                       loop.distance.kind if config.sym else None, saved)


def _trainable(G: nn.Module, config: TrainConfig, params: list[nn.Parameter] | None) -> list[nn.Parameter]:
    """The tensors to train: new adapters (+ the extras with train_extras), or the given `params` alone."""
    from my3dgen_cli.lora import add_adapters, add_extras, match_extras

    if params is None:
        init_gen = torch.Generator().manual_seed(config.seed)
        params = add_adapters(G, rank=config.rank, alpha=config.alpha, targets=config.targets,
                              style=config.style, generator=init_gen)
        if config.train_extras:
            params += add_extras(G, match_extras(G))
        return params
    for p in G.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return params


@dataclass
class _Loop:
    """What every step of one training run shares: the model, data, optimizer and the batch generator."""

    G: nn.Module
    config: TrainConfig
    world: Dist
    params: list[nn.Parameter]
    anchors_ws: torch.Tensor
    cameras: torch.Tensor
    lpips: nn.Module | None
    photo: torch.Tensor
    photo_raw: torch.Tensor
    rng: torch.Generator
    opt: Adam
    scaler: torch.amp.GradScaler
    distance: SymmetryDistance
    nhwc: bool
    rig: Any
    workers: int = 1  # CPU: parts of each chunk of photos rendered at once, one core each (speed.cpu_workers)
    twins: list | None = None  # CPU: the twin processes of the workers beyond this one (twin.py), made at first use
    synth: Callable = field(init=False)

    def __post_init__(self) -> None:
        self.synth = self.G.synthesis
        if self.config.compile:
            from my3dgen_cli.speed import compiled

            self.synth = compiled(self.G.synthesis)


def _resume(loop: _Loop, checkpoint_dir: Path, fingerprint: dict[str, Any]) -> tuple[int, list[dict[str, float]]]:
    """Load the newest checkpoint into the loop's tensors, optimizer, scaler and generator: (step, log)."""
    state = resume_checkpoint(checkpoint_dir, fingerprint)
    if state is None:
        return 0, []
    with torch.no_grad():
        for p, saved in zip(loop.params, state.params, strict=True):
            p.copy_(saved.to(p.device))
    try:
        loop.opt.load_state_dict(state.optimizer)
    except ValueError as err:
        raise UserInputError(f"--resume: the newest checkpoint in {checkpoint_dir} does not fit this run ({err}); "
                             "rerun with --force to start over") from None
    if state.scaler is not None:
        loop.scaler.load_state_dict(state.scaler)
    loop.rng.set_state(state.rng)
    return state.step, list(state.log)


def _chunk_loss(loop: _Loop, chunk: torch.Tensor, share: float, sym_cams: torch.Tensor | None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of the photos `chunk` (weighted by their `share` of the batch, plus the symmetry term with
    `sym_cams`) and its row of the step's totals (loss, mse, lpips, sym)."""
    config = loop.config
    with autocast(loop.photo.device, config.amp):
        out, sym = _forward(loop.G, loop.synth, loop.anchors_ws[chunk], loop.cameras[chunk], loop.nhwc, sym_cams,
                            loop.distance)
    mse, perc = reconstruction_terms(out, loop.photo[chunk], loop.photo_raw[chunk], loop.lpips)
    loss = (mse + perc) * share
    totals = torch.stack([mse + perc, mse, perc, torch.zeros_like(mse)]).detach() * share
    if sym is not None:
        loss = loss + config.sym_weight * sym
        totals += _sym_totals(config.sym_weight, sym)
    return loss, totals


def _sym_term(loop: _Loop, latent: torch.Tensor, sym_cams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted symmetry term of anchor `latent` ([1] index) in a pass of its own, and its row of the totals."""
    with autocast(loop.photo.device, loop.config.amp):
        sym = symmetry_loss(loop.G, loop.anchors_ws[latent], sym_cams, loop.distance, channels_last=loop.nhwc).float()
    return loop.config.sym_weight * sym, _sym_totals(loop.config.sym_weight, sym)


def _part_gradients(loop: _Loop, part: torch.Tensor, share: float,
                    ) -> tuple[tuple[torch.Tensor | None, ...], torch.Tensor]:
    """`_chunk_loss` of one part and its gradients (returned, not accumulated: the caller sums the parts in order)."""
    loss, totals = _chunk_loss(loop, part, share, None)
    return torch.autograd.grad(loop.scaler.scale(loss), loop.params, allow_unused=True), totals


def _sym_gradients(loop: _Loop, latent: torch.Tensor, sym_cams: torch.Tensor,
                   ) -> tuple[tuple[torch.Tensor | None, ...], torch.Tensor]:
    """`_sym_term` and its gradients, as `_part_gradients` returns them."""
    sym, totals = _sym_term(loop, latent, sym_cams)
    return torch.autograd.grad(loop.scaler.scale(sym), loop.params, allow_unused=True), totals


def _run_task(loop: _Loop, task: tuple) -> tuple[tuple[torch.Tensor | None, ...], torch.Tensor]:
    """One task of a step, ("part", photo indices, share of the batch) or ("sym", latent index, cameras):
    `_part_gradients` or `_sym_gradients`. Indices and cameras as tensors, or numpy arrays (sent to a twin)."""
    kind, rows, arg = task
    rows = torch.as_tensor(rows, device=loop.photo.device)
    if kind == "sym":
        return _sym_gradients(loop, rows, torch.as_tensor(arg, device=loop.photo.device))
    return _part_gradients(loop, rows, arg)


def _run_tasks(loop: _Loop, tasks: list[tuple]) -> list[tuple[tuple[torch.Tensor | None, ...], torch.Tensor]]:
    """The tasks at once, one core each, results in order: the first here and the others on the twin processes
    (twin.py), or on threads (speed.run_parallel) where there are none or where each task gets more than one of
    torch's threads (a twin runs on one). A twin lost on the way hands its task back: it runs here, and later steps
    use threads."""
    twins = _twins(loop) if torch.get_num_threads() // len(tasks) <= 1 else []
    if len(tasks) < 2 or len(twins) < len(tasks) - 1:
        return run_parallel([functools.partial(_run_task, loop, task) for task in tasks])
    sent: list[twin.Twin | None] = []
    results = []
    with one_thread_each(len(tasks)):  # one thread here, as the twins have
        for each, task in zip(twins, tasks[1:], strict=False):
            try:
                each.submit(_portable(task))
                sent.append(each)
            except twin.TwinLost:
                sent.append(None)
        try:
            results.append(_run_task(loop, tasks[0]))
        except BaseException:
            _close_twins(loop)  # their replies would be read as the next step's
            raise
        for each, task in zip(sent, tasks[1:], strict=True):
            try:
                if each is None:
                    raise twin.TwinLost("not sent")
                results.append(each.result())
            except twin.TwinLost:
                _close_twins(loop)
                results.append(_run_task(loop, task))
    return results


def _portable(task: tuple) -> tuple:
    """A task as a twin receives it: tensors as numpy arrays (sent by value, no shared-memory handles)."""
    return tuple(part.cpu().numpy() if isinstance(part, torch.Tensor) else part for part in task)


def _twins(loop: _Loop) -> list[twin.Twin]:
    """The run's twin processes (workers - 1 of them), forked at first use; none off the CPU, under
    torch.distributed, where fork is not available (twin.available) or after one was lost. (_run_tasks asks only
    when each task gets one thread.)"""
    if loop.twins is None:
        loop.twins = []
        if (loop.workers > 1 and loop.photo.device.type == "cpu" and not loop.world.active
                and twin.available()):
            totals = torch.zeros(4, device=loop.photo.device)
            try:
                loop.twins = [twin.Twin(functools.partial(_run_task, loop), loop.params, totals)
                              for _ in range(loop.workers - 1)]
            except Exception:  # no shared memory, no fork or no children here: threads
                _close_twins(loop)
    return loop.twins


def _close_twins(loop: _Loop) -> None:
    """Stop the twins for good (the run goes on on threads)."""
    for each in loop.twins or []:
        each.close()
    loop.twins = []


def _gradients(loop: _Loop, step: int) -> tuple[torch.Tensor, bool]:
    """The gradients of step `step` (its batch and symmetry cameras drawn from loop.rng) in the leaves' .grad;
    (this rank's totals: loss, mse, lpips, sym; whether the step has a symmetry term)."""
    config, world, device = loop.config, loop.world, loop.photo.device
    n = loop.photo.shape[0]
    idx = torch.randperm(n, generator=loop.rng)[: min(config.batch, n)].to(device)
    do_sym = config.sym and config.sym_every > 0 and step % config.sym_every == 0
    sym_cams = symmetry_cameras(1, config.sym_yaw, loop.rng, rig=loop.rig).to(device) if do_sym else None
    sym_rank = (step // config.sym_every) % world.world  # the symmetry term rotates over ranks
    loop.opt.zero_grad(set_to_none=True)
    totals = torch.zeros(4, device=device)  # loss, mse, lpips, sym: this rank's share
    sym_here = sym_cams is not None and sym_rank == world.rank
    # CPU threads: the symmetry term is a task of its own beside the first chunk's photos (it renders two views,
    # which on the thread of a one-photo part would keep the others waiting). Otherwise the symmetry latent
    # idx[0] opens rank 0's first chunk and its tri-planes come from that pass.
    sym_task = sym_here and loop.workers > 1
    share_planes = sym_here and not sym_task and world.rank == 0 and not config.compile and ops.fast_paths()
    for k, chunk in enumerate(c for c in torch.tensor_split(shard(idx, world), config.accum) if c.numel()):
        # with the symmetry task beside them, the chunk's photos take one thread fewer: on 2 threads the batch is one
        # pass and the symmetry's two views the other, about equal work (3 tasks on 2 cores left one idle at the end)
        threads = loop.workers - 1 if sym_task and k == 0 else loop.workers
        parts = [part for part in torch.tensor_split(chunk, max(1, threads)) if part.numel()]
        if len(parts) == 1 and not (sym_task and k == 0):
            loss, chunk_totals = _chunk_loss(loop, chunk, chunk.numel() / idx.numel(),
                                             sym_cams if share_planes and k == 0 else None)
            loop.scaler.scale(loss).backward()
            totals += chunk_totals
            continue
        # the chunk's photos (and the symmetry term) on parallel threads or the twin, their gradients summed in order
        tasks = [("part", part, part.numel() / idx.numel()) for part in parts]
        if sym_task and k == 0:
            tasks.append(("sym", idx[:1], sym_cams))
        for grads, part_totals in _run_tasks(loop, tasks):
            totals += part_totals
            add_gradients(loop.params, grads)
    if sym_here and not share_planes and not sym_task:
        sym, sym_totals = _sym_term(loop, idx[:1], sym_cams)
        loop.scaler.scale(sym).backward()
        totals += sym_totals
    return totals, sym_cams is not None


def _update(loop: _Loop, step: int, totals: torch.Tensor, sym: bool) -> dict[str, float]:
    """The optimizer step on the summed gradients; the step's log record (loss, mse, lpips, sym on symmetry steps)."""
    world = loop.world
    sum_gradients(loop.params, world)  # summed scaled gradients: every rank sees the same inf/nan
    loop.scaler.step(loop.opt)  # fp16: unscale, skip the step on inf/nan; otherwise opt.step()
    loop.scaler.update()
    loss, mse_v, perc_v, sym_v = reduce_sum(totals, world).tolist()  # the step's one host sync
    record = {"step": step + 1, "loss": loss, "mse": mse_v, "lpips": perc_v}
    if sym:
        record["sym"] = sym_v
    return record
