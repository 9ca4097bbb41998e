"""`personalize`: ~10 photos of one person -> an identity folder (LoRA adapter on a frozen base).

Stages (each with a progress bar when run from the CLI):
    1. photos -> 512 px crops + camera labels (faces module), optionally with mirrored copies;
    2. anchors: each photo projected into W of the frozen base, in chunks saved as they finish
       (anchor_chunks.project_anchors), or a My3DGen dataset folder's own latents (latents_import);
    3. adapter training: LoRA on the default targets, My3DGen's loss + symmetry term (training.py);
    4. the identity folder: adapter, anchors, preview grid, loss log and curve (identity.py layout).

    from my3dgen_cli.personalize.pipeline import PersonalizeConfig, personalize
    result = personalize("photos/", "ana", PersonalizeConfig(steps=500))
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from my3dgen_cli import __version__
from my3dgen_cli.errors import UserInputError
from my3dgen_cli.fileio import write_text_atomic
from my3dgen_cli.latents import DatasetLatents, dataset_latents
from my3dgen_cli.output import Output
from my3dgen_cli.personalize.distributed import SINGLE, Dist

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")  # as faces.py
# --budget presets: (training steps, anchor projection steps per photo). "paper" = My3DGen's defaults.
BUDGETS = {"quick": (300, 100), "standard": (600, 200), "paper": (1000, 300)}


@dataclass(frozen=True)
class PersonalizeConfig:
    """Settings of one personalization; saved in the adapter's metadata. Paper defaults."""

    rank: int = 1
    alpha: float | None = None  # None = rank (scale 1)
    style: str = "my3dgen"
    include_mapping: bool = False
    include_decoder: bool = False
    train_extras: bool = True  # also train My3DGen's extras: b4.const, biases, noise strengths (lora.EXTRA_TARGETS)
    steps: int = 1000
    batch: int = 2
    lr: float = 0.0025
    betas: tuple[float, float] = (0.0, 0.99)
    sym: bool = True
    sym_loss: str = "id"
    sym_every: int = 4
    sym_weight: float = 1.0
    sym_yaw: float = 35.0  # degrees; symmetry views are drawn from [-sym_yaw, sym_yaw]
    anchor_steps: int = 300
    anchor_space: str = "w"
    anchor_lr: float = 0.01
    mirror: bool = False
    seed: int = 0
    checkpoint_every: int = 100
    amp: bool | str = False  # False/"off", True/"bf16", "fp16" (CUDA): speed.autocast
    accum: int = 1  # micro-batches per step (same effective batch, less memory)
    act_checkpointing: bool = False  # recompute activations in backward (less memory, ~1/3 more time)
    compile: bool = False  # torch.compile the generator's synthesis
    channels_last: bool | None = None  # NHWC convolutions; None = with autocast on CUDA (speed.use_channels_last)

    def __post_init__(self) -> None:
        from my3dgen_cli.lora import CONV_STYLES
        from my3dgen_cli.personalize.anchors import SPACES
        from my3dgen_cli.personalize.symmetry import SYM_LOSSES
        from my3dgen_cli.speed import AMP_MODES

        if not isinstance(self.amp, bool) and self.amp not in AMP_MODES:
            raise UserInputError(f"amp: got {self.amp!r}, expected a bool or one of {', '.join(AMP_MODES)}")
        for name, least in (("rank", 1), ("steps", 1), ("batch", 1), ("anchor_steps", 0), ("accum", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < least:
                raise UserInputError(f"{name}: got {value!r}, expected an integer >= {least}")
        if self.alpha is not None and self.alpha <= 0:
            raise UserInputError(f"alpha: got {self.alpha}, expected > 0")
        if not self.lr > 0 or not self.anchor_lr > 0:
            raise UserInputError(f"lr: got {self.lr} (anchor {self.anchor_lr}), expected > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise UserInputError(f"betas: got {self.betas}, expected two values in [0, 1)")
        if self.sym_loss not in SYM_LOSSES:
            raise UserInputError(f"sym_loss: got {self.sym_loss!r}, expected one of {', '.join(SYM_LOSSES)}")
        if self.sym_every < 1 or self.checkpoint_every < 0:
            raise UserInputError(f"sym_every / checkpoint_every: got {self.sym_every} / {self.checkpoint_every}, "
                                 "expected >= 1 / >= 0")
        if not 0 < self.sym_yaw <= 90:
            raise UserInputError(f"sym_yaw: got {self.sym_yaw}, expected degrees in (0, 90]")
        if self.anchor_space not in SPACES:
            raise UserInputError(f"anchor_space: got {self.anchor_space!r}, expected one of {', '.join(SPACES)}")
        if self.style not in CONV_STYLES:
            raise UserInputError(f"style: got {self.style!r}, expected one of {', '.join(CONV_STYLES)}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

    def targets(self) -> tuple[str, ...]:
        from my3dgen_cli.lora import DECODER_TARGETS, DEFAULT_TARGETS, MAPPING_TARGETS

        return DEFAULT_TARGETS + (MAPPING_TARGETS if self.include_mapping else ()) + (
            DECODER_TARGETS if self.include_decoder else ())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PersonalizeConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if k == "betas" else v) for k, v in data.items() if k in known})

    def train_fingerprint(self) -> dict[str, Any]:
        """Settings a resumed run must share with the interrupted one (all but checkpoint_every and the
        exact speed options: activation checkpointing, compile and channels_last change no number that
        matters)."""
        d = self.to_dict()
        for key in ("checkpoint_every", "act_checkpointing", "compile", "channels_last"):
            d.pop(key)
        return d


@dataclass
class Photos:
    """Training photos: images [N, 3, 512, 512] in [-1, 1], cameras [N, 25], names, skipped files, and the
    latents of a My3DGen dataset folder (the anchors, one per photo in this order) when it came with them."""

    images: torch.Tensor
    cameras: torch.Tensor
    names: list[str]
    skipped: list[str] = field(default_factory=list)
    latents: DatasetLatents | None = None

    def mirrored(self) -> Photos:
        """Photos plus their horizontally flipped copies seen from the mirror cameras."""
        from my3dgen_cli.eg3d.camera import mirror_camera

        return Photos(torch.cat([self.images, self.images.flip(-1)]),
                      torch.cat([self.cameras, mirror_camera(self.cameras)]),
                      self.names + [f"{n}-mirror" for n in self.names], self.skipped)


def read_photos(inputs: str | Path | list[str | Path], labels: str | Path | None = None,
                aligned: bool | None = None, on_progress: Any = None, reproject: bool = False) -> Photos:
    """The photo front end: files/folders -> Photos through the faces module.

    A folder holding an EG3D `dataset.json` is read as aligned crops with known cameras (as EG3D's
    own datasets) unless `aligned=False`; `labels` names a dataset.json explicitly. A My3DGen dataset
    folder (images with `.npy` latents, latents_import) also gives its latents, checked one-to-one
    against the images and the dataset.json, unless `reproject`.
    """
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    for item in items:
        if not Path(item).exists():
            raise UserInputError(f"photos: {item} does not exist")
    if labels is None:
        found = [Path(i) / "dataset.json" for i in items if (Path(i) / "dataset.json").is_file()]
        labels = found[0] if found else None
    if aligned is None:
        aligned = labels is not None
    files = [f for i in items for f in ([Path(i)] if Path(i).is_file() else sorted(Path(i).iterdir()))
             if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")]
    if not files:
        raise UserInputError(f"photos: no image files in {', '.join(str(i) for i in items)} "
                             f"(expected {', '.join(IMAGE_SUFFIXES)})")
    try:
        from my3dgen_cli.faces import prepare as faces
    except ImportError:  # until the faces module is installed: aligned crops with a dataset.json only
        return _read_aligned(files, labels, aligned, on_progress)
    latents = None if reproject else dataset_latents([Path(i) for i in items], files,
                                                     None if labels is None else Path(labels), bool(aligned))
    fs = faces.prepare_faces(items, min_faces=1, labels=labels, aligned=bool(aligned), on_progress=on_progress)
    if latents is not None and fs.skipped:  # every photo has its latent: one unusable photo breaks the pairing
        raise UserInputError(f"{fs.skipped[0]} (in a dataset with latents; fix it or pass --reproject)")
    names = [f.stem for f in fs]
    return Photos(fs.images(), fs.cameras(), names, [str(s) for s in fs.skipped],
                  None if latents is None else latents.ordered(names))


def _read_aligned(files: list[Path], labels: str | Path | None, aligned: bool, on_progress: Any) -> Photos:
    """Aligned crops listed in an EG3D dataset.json ({"labels": [[file, [25 floats]], ...]})."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if labels is None or not aligned:
        raise UserInputError("photos: face detection needs the faces module; give aligned crops with a dataset.json")
    try:
        table = {Path(k).stem: v for k, v in json.loads(Path(labels).read_text(encoding="utf-8"))["labels"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserInputError(f"{labels}: cannot read dataset.json ({err})") from None
    images, cams, names, skipped = [], [], [], []
    for f in files:
        try:
            if f.stem not in table:
                raise UserInputError("not listed in dataset.json")
            with Image.open(f) as im:
                crop = im.convert("RGB").resize((512, 512), Image.Resampling.LANCZOS)
            images.append(torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1).float() / 127.5 - 1)
            cams.append(torch.tensor(table[f.stem], dtype=torch.float32).reshape(25))
            names.append(f.stem)
        except (UserInputError, UnidentifiedImageError, OSError, RuntimeError) as err:
            skipped.append(f"{f}: {err}")
        if on_progress is not None:
            on_progress(f)
    if not images:
        raise UserInputError(f"got 0 usable photo(s) of {len(files)}, expected at least 1 (skipped: {skipped[0]})")
    return Photos(torch.stack(images), torch.stack(cams), names, skipped)


@dataclass
class LossNets:
    """The pretrained networks the losses use; None = unavailable (pixel / LPIPS fallbacks)."""

    anchor_lpips: nn.Module | None
    train_lpips: nn.Module | None
    identity: nn.Module | None

    @classmethod
    def load(cls, config: PersonalizeConfig, offline: bool | None = None, output: Output | None = None) -> LossNets:
        """LPIPS-VGG for anchors, LPIPS-alex for training, ArcFace for symmetry: from the zoo, with one warning each."""
        from my3dgen_cli.losses.arcface import identity_network
        from my3dgen_cli.losses.perceptual import offline_fallback, perceptual_loss

        out = output or Output("quiet")
        vgg = perceptual_loss("vgg", offline=offline, required=False, output=output)
        alex = perceptual_loss("alex", offline=offline, required=False, output=output)
        if alex is None or vgg is None:
            missing = [n for n, m in (("lpips-vgg16", vgg), ("lpips-alexnet", alex)) if m is None]
            out.warn(offline_fallback(missing, "using pixel losses instead of LPIPS"))
        ident = None
        if config.sym and config.sym_loss == "id":
            ident = identity_network(offline=offline, output=output)
            if ident is None:
                instead = "LPIPS" if alex is not None else "pixel MSE"
                out.warn(offline_fallback(["arcface-ir-se50"], f"the symmetry term uses {instead} instead"))
        return cls(vgg, alex, ident)

    def to(self, device: torch.device) -> LossNets:
        return LossNets(*(m.to(device) if m is not None else None
                          for m in (self.anchor_lpips, self.train_lpips, self.identity)))


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

    @property
    def ratio(self) -> float:
        """How many times fewer parameters than full fine-tuning of the generator."""
        return self.full_parameters / max(self.parameters, 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["folder"], d["ratio"] = str(self.folder), round(self.ratio, 1)
        return d


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
) -> IdentityResult:
    """Personalize the base generator to the person in `photos`; write identities/<name>/.

    photos: files/folders (read with `read_photos`) or a Photos. generator: use this generator as
    the base (its weights are the base; `base` is the name recorded) instead of opening `base`.
    nets: loss networks (default: LossNets.load). resume: continue an interrupted run from the
    identity's checkpoints/: its newest training checkpoint, or the anchors projected so far (saved
    after each chunk; checked against the photos, base and anchor settings); finished anchors are
    reused. force: replace an existing identity. A My3DGen dataset folder's own latents (Photos.latents)
    are the anchors as they are, without projection, unless `reproject` (read_photos).
    world: this process's place in a data-parallel group (distributed.Dist; torchrun): every rank
    calls this with the same arguments, anchors are projected in chunks shared among the ranks,
    training is data-parallel, and only rank 0 writes files (the identity folder must be on a
    filesystem all ranks see when resuming). made_by: recorded in the adapter's metadata (extra.made_by) so a
    tool that owns an identity (the demo) can tell its own from one the user made under the same name.
    Raises UserInputError for unusable photos or an existing identity, AnchorsInterrupted or
    TrainingInterrupted on Ctrl-C (exit code 130; both leave what --resume needs).
    """
    from my3dgen_cli.adapter_file import save_adapter
    from my3dgen_cli.identity import Anchors, identity_paths, write_anchors
    from my3dgen_cli.lora import base_fingerprint, count_adapter_parameters
    from my3dgen_cli.personalize.anchor_chunks import anchor_fingerprint
    from my3dgen_cli.personalize.training import train_adapter

    config = config or PersonalizeConfig()
    out = output or Output("quiet")
    ip = identity_paths(name)
    if ip.adapter.is_file() and not (force or resume):
        raise UserInputError(f"identity {name!r} already exists ({ip.root}); pass --force to replace it")
    if resume and not ip.resumable():
        raise UserInputError(f"--resume: identity {name!r} has no checkpoint to continue from; run without --resume")
    with out.progress() as bar:
        if not isinstance(photos, Photos):
            task = bar.add_task("photos", total=None, status="")
            photos = read_photos(photos, labels=labels, aligned=aligned, reproject=reproject,
                                 on_progress=lambda p: bar.update(task, advance=1, status=Path(p).name))
        for skipped in photos.skipped:
            out.warn(f"skipped {skipped}")
        if config.mirror and photos.latents is not None:
            raise UserInputError("--mirror: the dataset's latents anchor its photos, not their mirrors; "
                                 "pass --reproject to project both")
        if config.mirror:
            photos = photos.mirrored()
        if generator is None:
            from my3dgen_cli.generators import open_base

            G, ref = open_base(base, device=device, offline=offline)
            base, fingerprint = ref.name, ref.sha256
        else:
            G = generator.to(device) if device is not None else generator
            fingerprint = base_fingerprint(G)
        dev = next(G.parameters()).device
        given_ws = None if photos.latents is None else photos.latents.ws(G.num_ws, G.w_dim).to(dev)
        if dev.type == "cpu":
            out.warn("training on the CPU will be slow (minutes per 100 steps at full size); use --device cuda or mps")
        nets = (nets or LossNets.load(config, offline=offline, output=out)).to(dev)
        images, cameras = photos.images.to(dev), photos.cameras.to(dev)
        if resume and ip.anchors.is_file():
            from my3dgen_cli.identity import read_anchors

            ws = read_anchors(ip.anchors).ws.to(dev)
            if ws.shape[0] != images.shape[0]:
                raise UserInputError(f"--resume: the saved anchors hold {ws.shape[0]} photos, got {images.shape[0]}")
        elif given_ws is not None:
            from my3dgen_cli.latents import latent_space

            out.info(f"anchors: the {len(photos.names)} latents of {photos.latents.folder} as they are, "
                     "no projection (--reproject projects the photos)")
            ws = given_ws
            if world.is_main:
                if not resume:
                    shutil.rmtree(ip.checkpoints, ignore_errors=True)
                write_anchors(ip.anchors, Anchors(ws, cameras, photos.names,
                                                  {"base": base, "space": latent_space(ws), "source": "dataset"}))
            world.barrier()
        else:
            if not resume and world.is_main:
                shutil.rmtree(ip.checkpoints, ignore_errors=True)
            ws = _anchors(G, images, cameras, config, nets.anchor_lpips, ip.partial_anchors,
                          anchor_fingerprint(config, photos.names, base, fingerprint, nets.anchor_lpips),
                          resume, world, bar, out)
            if world.is_main:
                anchor_extra = {"base": base, "space": config.anchor_space}
                write_anchors(ip.anchors, Anchors(ws, cameras, photos.names, anchor_extra))
                ip.partial_anchors.unlink(missing_ok=True)
            world.barrier()
        sym_distance = None
        if config.sym:
            from my3dgen_cli.personalize.symmetry import choose_distance

            sym_distance = choose_distance(config.sym_loss, nets.identity, nets.train_lpips)
        task = bar.add_task("training", total=config.steps, status="")

        def step_done(step: int, record: dict[str, float]) -> None:
            bar.update(task, completed=step, status=f"loss {record['loss']:.4f}")
            if on_step is not None:
                on_step(step, record)

        result = train_adapter(G, images, cameras, ws, config, lpips=nets.train_lpips, sym_distance=sym_distance,
                               checkpoint_dir=ip.checkpoints, resume=resume, on_step=step_done, world=world)
    n_params = count_adapter_parameters(G)
    full = sum(p.numel() for n, p in G.named_parameters() if ".adapter." not in n)
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    extra = {"config": config.to_dict(), "photos": photos.names, "parameters": n_params, "created": created,
             "steps": result.steps, "sym_loss": result.sym_kind, "version": __version__}
    if made_by is not None:
        extra["made_by"] = made_by
    if world.is_main:
        save_adapter(G, ip.adapter, base, fingerprint, extra)
        _write_reports(G, ip, images, cameras, ws, result.log)
        shutil.rmtree(ip.checkpoints, ignore_errors=True)
    world.barrier()
    final = result.log[-1]["loss"] if result.log else float("nan")
    size = ip.adapter.stat().st_size if ip.adapter.is_file() else 0  # 0 on a rank that cannot see rank 0's folder
    return IdentityResult(name, ip.root, base, photos.names, photos.skipped, n_params, full,
                          size, result.steps, final, result.sym_kind, result.seconds,
                          "projected" if photos.latents is None else "dataset")


def _anchors(G: nn.Module, images: torch.Tensor, cameras: torch.Tensor, config: PersonalizeConfig,
             lpips: nn.Module | None, partial: Path, fingerprint: dict[str, Any], resume: bool, world: Dist,
             bar: Any, out: Output) -> torch.Tensor:
    """The anchor stage with its progress bar; photos reused from an interrupted run count as done."""
    from my3dgen_cli.personalize.anchor_chunks import CHUNK, project_anchors

    n = images.shape[0]
    task = bar.add_task("anchors", total=config.anchor_steps * -(-n // CHUNK), status="")

    def reused(m: int) -> None:
        bar.update(task, advance=config.anchor_steps * -(-m // CHUNK))
        out.info(f"anchors: reusing {m} of {n} photos projected before the interruption")

    return project_anchors(G, images, cameras, config, lpips, partial=partial, fingerprint=fingerprint,
                           resume=resume, world=world, on_reused=reused,
                           on_step=lambda s, loss: bar.update(task, advance=1, status=f"loss {loss:.4f}"))


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
