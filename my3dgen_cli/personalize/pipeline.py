"""`personalize`: ~10 photos of one person -> an identity folder (LoRA adapter on a frozen base).

Stages (each with a progress bar when run from the CLI):
    1. photos -> 512 px crops + camera labels (photos.read_photos, the faces module), optionally
       with mirrored copies;
    2. anchors: each photo projected into W of the frozen base, in chunks saved as they finish
       (anchor_chunks.project_anchors), or a My3DGen dataset folder's own latents (latents_import);
    3. adapter training: LoRA on the default targets, My3DGen's loss + symmetry term (training.py);
    4. the identity folder: adapter, anchors, preview grid, loss log and curve (identity.py layout).

Everything is built in the hidden folder `identities/.NAME.build` (identity.build_paths) and swapped
in when complete (identity.building_identity), so an interrupted run, `--force` included, leaves an
existing identity whole; the build folder is what `--resume` continues.

    from my3dgen_cli.personalize.pipeline import PersonalizeConfig, personalize
    result = personalize("photos/", "ana", PersonalizeConfig(steps=500))
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from my3dgen_cli import __version__
from my3dgen_cli.errors import My3DGenError, UserInputError
from my3dgen_cli.fileio import write_text_atomic
from my3dgen_cli.identity import IdentityPaths
from my3dgen_cli.output import Output
from my3dgen_cli.personalize.config import BUDGETS, PersonalizeConfig
from my3dgen_cli.personalize.distributed import SINGLE, Dist, fault_hook
from my3dgen_cli.personalize.nets import LossNets
from my3dgen_cli.personalize.photos import Photos, read_photos

__all__ = ["BUDGETS", "IdentityResult", "LossNets", "PersonalizeConfig", "Photos", "can_resume", "describe_identity",
           "personalize", "read_photos"]


@dataclass
class IdentityResult:
    name: str
    folder: Path
    base: str
    photos: list[str]
    skipped: list[str]
    parameters: int
    full_parameters: int
    adapter_bytes: int
    steps: int
    final_loss: float
    sym_loss: str | None
    seconds: float
    anchors: str = "projected"  # "dataset": the My3DGen dataset's own latents, not projected
    estimate: dict[str, Any] | None = None  # the projected duration measured before the run (estimate.Estimate)

    @property
    def ratio(self) -> float:
        """How many times fewer parameters than full fine-tuning of the generator."""
        return self.full_parameters / max(self.parameters, 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["folder"], d["ratio"] = str(self.folder), round(self.ratio, 1)
        return d


def can_resume(name: str) -> bool:
    """True when `personalize NAME --resume` has something to continue: an unfinished build (a training
    checkpoint, partial anchors or finished anchors) or an unfinished run of an older my3dgen, which
    built in the identity's own folder."""
    from my3dgen_cli.identity import build_paths, identity_paths

    final = identity_paths(name)
    return _build_resumable(build_paths(name)) or (not final.adapter.is_file() and final.resumable())


def _build_resumable(build: IdentityPaths) -> bool:
    return build.resumable() or build.anchors.is_file()


def _prepare_build(name: str, resume: bool, force: bool, world: Dist) -> None:
    """Refuse a run that cannot start; then empty the build folder (a new run) or keep it (--resume)."""
    from my3dgen_cli.identity import build_paths, identity_paths

    final, build = identity_paths(name), build_paths(name)
    if final.adapter.is_file() and not (force or resume):
        hint = " (or --resume to finish the interrupted replacement)" if _build_resumable(build) else ""
        raise UserInputError(f"identity {name!r} already exists ({final.root}); pass --force to replace it{hint}")
    if resume and not can_resume(name):
        raise UserInputError(f"--resume: identity {name!r} has no checkpoint to continue from; run without --resume")
    if not (resume or force) and _build_resumable(build):  # never throw away an interrupted run's hours silently
        raise UserInputError(f"an interrupted personalize of {name!r} was kept ({build.root}); pass --resume to "
                             "continue it, or --force to start over")
    world.barrier()  # every rank has checked before rank 0 changes the folders
    if world.is_main:
        if not resume:
            shutil.rmtree(build.root, ignore_errors=True)
        elif not _build_resumable(build):  # an older version's unfinished run: continue it in the build folder
            shutil.rmtree(build.root, ignore_errors=True)
            os.replace(final.root, build.root)
    world.barrier()


@dataclass
class _Run:
    """What every stage uses: the base generator, its name and fingerprint, the loss networks and the data."""

    G: nn.Module
    base: str
    fingerprint: str
    nets: LossNets
    images: torch.Tensor
    cameras: torch.Tensor
    given_ws: torch.Tensor | None  # a My3DGen dataset folder's own latents (the anchors), else None
    sym_distance: Any

    @property
    def device(self) -> torch.device:
        return self.images.device


def _open_run(photos: Photos, config: PersonalizeConfig, generator: nn.Module | None, base: str, device: Any,
              nets: LossNets | None, offline: bool | None, out: Output) -> _Run:
    """Open the base (or take `generator`), check a dataset's latents against it, load the loss networks."""
    from my3dgen_cli.lora import base_fingerprint
    from my3dgen_cli.speed import check_amp_on

    if generator is None:
        from my3dgen_cli.generators import open_base

        G, ref = open_base(base, device=device, offline=offline)
        base, fingerprint = ref.name, ref.sha256
    else:
        G = generator.to(device) if device is not None else generator
        fingerprint = base_fingerprint(G)
    dev = next(G.parameters()).device
    check_amp_on(dev, config.amp)  # before the loss networks load and minutes of anchors
    given_ws = None if photos.latents is None else photos.latents.ws(G.num_ws, G.w_dim).to(dev)
    nets = (nets or LossNets.load(config, offline=offline, output=out)).to(dev)
    sym_distance = None
    if config.sym:
        from my3dgen_cli.personalize.symmetry import choose_distance

        sym_distance = choose_distance(config.sym_loss, nets.identity, nets.train_lpips)
    return _Run(G, base, fingerprint, nets, photos.images.to(dev), photos.cameras.to(dev), given_ws, sym_distance)


def personalize(
    photos: str | Path | list[str | Path] | Photos,
    name: str,
    config: PersonalizeConfig | None = None,
    base: str = "eg3d-ffhq512-128",
    *,
    generator: nn.Module | None = None,
    device: torch.device | str | None = None,
    nets: LossNets | None = None,
    resume: bool = False,
    force: bool = False,
    labels: str | Path | None = None,
    aligned: bool | None = None,
    reproject: bool = False,
    offline: bool | None = None,
    output: Output | None = None,
    on_step: Any = None,
    world: Dist = SINGLE,
    made_by: str | None = None,
    estimate: bool = False,
) -> IdentityResult:
    """Personalize the base generator to the person in `photos`; write identities/<name>/.

    photos: files/folders (read with `read_photos`) or a Photos. generator: use this generator as
    the base (its weights are the base; `base` is the name recorded) instead of opening `base`.
    nets: loss networks (default: LossNets.load). The identity is built in `identities/.NAME.build`
    and swapped in when complete, so an interruption leaves an existing identity whole.
    resume: continue an interrupted run (a new one or a --force replacement) from its build folder:
    its newest training checkpoint, or the anchors projected so far (saved after each chunk; checked
    against the photos, base and anchor settings); finished anchors are reused. force: replace an
    existing identity. A My3DGen dataset folder's own latents (Photos.latents) are the anchors as they
    are, without projection, unless `reproject` (read_photos). estimate: time a few steps first and
    report the projected duration (estimate.py; the CLI does unless --no-estimate, i.e. config.estimate
    False; one process only).
    world: this process's place in a data-parallel group (distributed.Dist; torchrun): every rank
    calls this with the same arguments, anchors are projected in chunks shared among the ranks,
    training is data-parallel, and only rank 0 writes files (the identity folder must be on a
    filesystem all ranks see). made_by: recorded in the adapter's metadata (extra.made_by) so a
    tool that owns an identity (the demo) can tell its own from one the user made under the same name.
    Raises UserInputError for unusable photos or an existing identity, AnchorsInterrupted or
    TrainingInterrupted on Ctrl-C (exit code 130; both leave what --resume needs).
    """
    from my3dgen_cli.identity import building_identity, identity_lock, identity_paths

    config = config or PersonalizeConfig()
    out = output or Output("quiet")
    with identity_lock(name) if world.is_main else contextlib.nullcontext():  # one builder of a name at a time
        _prepare_build(name, resume, force, world)
        with _interrupt_says_how_to_go_on(name), building_identity(name, resumable=True, swap=world.is_main) as ip:
            with out.progress() as bar:
                photos = _gather_photos(photos, config, labels, aligned, reproject, bar, out)
                run = _open_run(photos, config, generator, base, device, nets, offline, out)
                saved = _saved_anchors(run, ip, resume, photos.names)  # before the estimate's timing steps
                measured = (_estimate(run, config, ip, resume, out) if estimate and config.estimate and world.world == 1
                            else None)
                if measured is None and run.device.type == "cpu" and run.G.img_resolution >= 256:  # not the tiny demo
                    out.warn("training on the CPU will be slow; use --device cuda or mps")
                ws = saved if saved is not None else _anchor_stage(run, config, photos, ip, resume, world, bar, out)
                result = _train_stage(run, config, ws, ip, resume, world, bar, on_step)
            n_params = _save_identity(run, config, photos, ws, result, ip, made_by, world)
            fault_hook(0, world, "swap")  # tests: stop here, with the new identity complete but not swapped in
            world.barrier()
        final = identity_paths(name)
        if world.is_main:
            shutil.rmtree(final.checkpoints, ignore_errors=True)  # after the swap: a stop before it can still resume
        world.barrier()
        full = sum(p.numel() for n, p in run.G.named_parameters() if ".adapter." not in n)
        final_loss = result.log[-1]["loss"] if result.log else float("nan")
        size = final.adapter.stat().st_size if final.adapter.is_file() else 0  # 0 on a rank that cannot see rank 0's
        return IdentityResult(name, final.root, run.base, photos.names, photos.skipped, n_params, full,
                              size, result.steps, final_loss, result.sym_kind, result.seconds,
                              "projected" if photos.latents is None else "dataset",
                              None if measured is None else measured.to_dict())


class PersonalizeInterrupted(My3DGenError):
    """Ctrl-C between the stages (loading, the estimate, the reports, the swap); the old identity is unchanged."""

    exit_code = 130


@contextmanager
def _interrupt_says_how_to_go_on(name: str) -> Iterator[None]:
    """A Ctrl-C outside the stages that report their own (AnchorsInterrupted, TrainingInterrupted) says what
    was kept and how to continue, instead of a bare "interrupted"."""
    try:
        yield
    except KeyboardInterrupt:
        then = ("run the same command with --resume to continue" if can_resume(name)
                else "run the same command again to start over")
        raise PersonalizeInterrupted(f"interrupted; identity {name!r} is as it was before this run; {then}") from None


def _gather_photos(photos: str | Path | list[str | Path] | Photos, config: PersonalizeConfig,
                   labels: str | Path | None, aligned: bool | None, reproject: bool, bar: Any, out: Output) -> Photos:
    """Read the photos (unless given as Photos), say which were skipped, add the mirrored ones."""
    if not isinstance(photos, Photos):
        task = bar.add_task("photos", total=None, status="")
        photos = read_photos(photos, labels=labels, aligned=aligned, reproject=reproject,
                             on_progress=lambda p: bar.update(task, advance=1, status=Path(p).name))
    for skipped in photos.skipped:
        out.warn(f"skipped {skipped}")
    if config.mirror and photos.latents is not None:
        raise UserInputError("--mirror: the dataset's latents anchor its photos, not their mirrors; "
                             "pass --reproject to project both")
    return photos.mirrored() if config.mirror else photos


def _estimate(run: _Run, config: PersonalizeConfig, ip: IdentityPaths, resume: bool, out: Output) -> Any:
    """Time a few steps of what is still to run and report the projected duration (estimate.py)."""
    from my3dgen_cli.personalize.estimate import measure_run

    needs_anchors = run.given_ws is None and not (resume and ip.anchors.is_file())
    measured = measure_run(run.G, run.images, run.cameras, config, run.nets, run.sym_distance, ip,
                           needs_anchors=needs_anchors, resume=resume)
    out.info(measured.line())
    advice = measured.cpu_advice()
    if advice is not None:
        out.warn(advice)
    return measured


def _anchor_stage(run: _Run, config: PersonalizeConfig, photos: Photos, ip: IdentityPaths, resume: bool,
                  world: Dist, bar: Any, out: Output) -> torch.Tensor:
    """The anchors ws [N, num_ws, w_dim]: the dataset's own latents, or projected (partly reused with --resume);
    saved (a resumed run's finished anchors come from `_saved_anchors` instead)."""
    from my3dgen_cli.identity import Anchors, write_anchors
    from my3dgen_cli.personalize.anchor_chunks import anchor_fingerprint

    if run.given_ws is not None:
        from my3dgen_cli.latents import latent_space

        out.info(f"anchors: the {len(photos.names)} latents of {photos.latents.folder} as they are, "
                 "no projection (--reproject projects the photos)")
        ws, extra = run.given_ws, {"base": run.base, "space": latent_space(run.given_ws), "source": "dataset"}
    else:
        ws = _project(run, config, ip.partial_anchors,
                      anchor_fingerprint(config, photos.names, run.base, run.fingerprint, run.nets.anchor_lpips),
                      resume, world, bar, out)
        extra = {"base": run.base, "space": config.anchor_space}
    if world.is_main:
        write_anchors(ip.anchors, Anchors(ws, run.cameras, photos.names, extra))
        ip.partial_anchors.unlink(missing_ok=True)
    world.barrier()
    return ws


def _saved_anchors(run: _Run, ip: IdentityPaths, resume: bool, names: list[str]) -> torch.Tensor | None:
    """--resume: the finished anchors of the interrupted run (None if it has none), UserInputError if they do not
    fit this run's photos (`names`, in order: other photos of the same count once trained on the wrong latents)."""
    from my3dgen_cli.identity import read_anchors

    if not (resume and ip.anchors.is_file()):
        return None
    n = run.images.shape[0]
    saved = read_anchors(ip.anchors)
    if saved.ws.shape[0] != n:
        raise UserInputError(f"--resume: the saved anchors hold {saved.ws.shape[0]} photos, got {n}")
    if list(saved.photos) != list(names):
        differ = next(i for i, (a, b) in enumerate(zip(saved.photos, names, strict=True)) if a != b)
        raise UserInputError(f"--resume: the interrupted run projected other photos ({saved.photos[differ]!r} where "
                             f"this run has {names[differ]!r}); rerun with the same photos, or --force to start over")
    return saved.ws.to(run.device)


def _project(run: _Run, config: PersonalizeConfig, partial: Path, fingerprint: dict[str, Any], resume: bool,
             world: Dist, bar: Any, out: Output) -> torch.Tensor:
    """The anchor projection with its progress bar; photos reused from an interrupted run count as done."""
    from my3dgen_cli.personalize.anchor_chunks import project_anchors

    n, chunk = run.images.shape[0], config.anchor_batch
    task = bar.add_task("anchors", total=config.anchor_steps * -(-n // chunk), status="")

    def reused(m: int) -> None:
        bar.update(task, advance=config.anchor_steps * -(-m // chunk))
        out.info(f"anchors: reusing {m} of {n} photos projected before the interruption")

    return project_anchors(run.G, run.images, run.cameras, config, run.nets.anchor_lpips, partial=partial,
                           fingerprint=fingerprint, resume=resume, world=world, on_reused=reused,
                           on_step=lambda s, loss: bar.update(task, advance=1, status=f"loss {loss:.4f}"))


def _train_stage(run: _Run, config: PersonalizeConfig, ws: torch.Tensor, ip: IdentityPaths, resume: bool,
                 world: Dist, bar: Any, on_step: Any) -> Any:
    """Train the adapter on run.G (checkpoints in the build folder) with a progress bar; a TrainResult."""
    from my3dgen_cli.personalize.training import train_adapter

    task = bar.add_task("training", total=config.steps, status="")

    def step_done(step: int, record: dict[str, float]) -> None:
        bar.update(task, completed=step, status=f"loss {record['loss']:.4f}")
        if on_step is not None:
            on_step(step, record)

    return train_adapter(run.G, run.images, run.cameras, ws, config.train_config(), lpips=run.nets.train_lpips,
                         sym_distance=run.sym_distance, checkpoint_dir=ip.checkpoints, resume=resume,
                         on_step=step_done, world=world)


def _save_identity(run: _Run, config: PersonalizeConfig, photos: Photos, ws: torch.Tensor, result: Any,
                   ip: IdentityPaths, made_by: str | None, world: Dist) -> int:
    """Write the adapter and the reports into the build folder (rank 0); the adapter's parameter count."""
    from my3dgen_cli.adapter_file import save_adapter
    from my3dgen_cli.lora import count_adapter_parameters

    n_params = count_adapter_parameters(run.G)
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    extra = {"config": config.to_dict(), "photos": photos.names, "parameters": n_params, "created": created,
             "steps": result.steps, "sym_loss": result.sym_kind, "version": __version__}
    if made_by is not None:
        extra["made_by"] = made_by
    if world.is_main:
        save_adapter(run.G, ip.adapter, run.base, run.fingerprint, extra)
        _write_reports(run.G, ip, run.images, run.cameras, ws, result.log)
    return n_params


def _write_reports(G: nn.Module, ip: Any, images: torch.Tensor, cameras: torch.Tensor, ws: torch.Tensor,
                   log: list[dict[str, float]]) -> None:
    """previews/grid.png (photo | personalized render, one row per photo), log.json, loss.png."""
    from my3dgen_cli.personalize.reports import loss_plot, preview_grid, save_png

    renders = []
    with torch.no_grad():
        for i in range(images.shape[0]):
            renders.append(G.synthesis(ws[i:i + 1], cameras[i:i + 1], noise_mode="const")["image"][0])
    grid = preview_grid([list(images), renders], tile=min(256, G.img_resolution * 2), labels=["photo", "personalized"])
    save_png(grid, ip.previews / "grid.png")
    write_text_atomic(ip.log, json.dumps({"steps": log}, indent=1))
    save_png(loss_plot(log), ip.loss_plot)


def describe_identity(name: str) -> dict[str, Any]:
    """name, base, parameters, adapter size (bytes), photos, created: for `my3dgen identities`."""
    from my3dgen_cli.adapter_file import read_adapter
    from my3dgen_cli.identity import identity_paths

    ip = identity_paths(name)
    adapter = read_adapter(ip.adapter)
    extra = adapter.extra
    created = extra.get("created") or datetime.fromtimestamp(ip.adapter.stat().st_mtime, timezone.utc).isoformat(
        timespec="seconds")
    return {"name": name, "base": adapter.base_name, "parameters": sum(t.numel() for t in adapter.tensors.values()),
            "bytes": ip.adapter.stat().st_size, "photos": len(extra.get("photos", [])), "created": created}
