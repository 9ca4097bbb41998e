"""`my3dgen demo`: the whole pipeline on a fresh machine (no network, no GPU) and an HTML report.

    result = run_demo(out_dir, fast=False)      # report at result.report

Without `--base`, the base is the demo's tiny synthetic generator (demo/base.py: the tiny EG3D
fitted to simple 3-D heads; it ships inside the wheel as the zoo entry `demo-tiny-v2`, so only the
adapter is trained here; `--rebuild-base` fits it again from the recipe), and the training photos
are renders of a hidden "person" (the base + a low-rank change, shipped beside it) from 10 known
cameras, with 2 more views held out. With `--base NAME --photos DIR` the same steps run on real
weights and photos (the last photo is held out). Then the real pipeline runs:

    personalize (identity `demo`) -> eval (the held-out views inverted under the base and the personalized
    prior; the first one's latent is kept) -> orbit -> interpolate two photos -> export ONNX -> report.html
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from my3dgen_cli.demo.report import SECTIONS, render_report
from my3dgen_cli.errors import My3DGenError, UserInputError
from my3dgen_cli.fileio import held_lock, write_text_atomic
from my3dgen_cli.output import Output

IDENTITY = "demo"
MADE_BY = "my3dgen demo"  # the demo's mark in its adapter's metadata: only an identity with it is replaced
TRAIN_YAWS = (-45.0, -35.0, -25.0, -15.0, -5.0, 5.0, 15.0, 25.0, 35.0, 45.0)
TRAIN_PITCHES = (0.0, 8.0, -6.0, 4.0, -3.0, 6.0, -8.0, 3.0, -4.0, 0.0)
HELD_OUT = ((-60.0, 5.0), (55.0, -5.0))
__all__ = ["SECTIONS", "DemoResult", "DemoSettings", "check_demo_identity", "demo_base", "run_demo"]


class DemoInterrupted(My3DGenError):
    """Ctrl-C in the demo's personalize stage."""

    exit_code = 130


@dataclass(frozen=True)
class DemoSettings:
    """Step counts of one demo run (`fast` for the test suite).

    The synthetic defaults trade a little fit for time: 30 anchor and eval steps instead of 60 cost
    about a third of the run and 1 dB of held-out PSNR (personalized 32.9 vs 33.9 dB; the base falls
    from 24.7 to 22.3 dB with the shorter inversions, so the gap stays ~10 dB); docs/demo.md has the sweep.
    """

    personalize_steps: int = 150
    anchor_steps: int = 30
    eval_steps: int = 30
    orbit_frames: int = 24
    interp_frames: int = 8

    @classmethod
    def for_run(cls, fast: bool, synthetic: bool) -> DemoSettings:
        if fast:
            return cls(personalize_steps=30, anchor_steps=15, eval_steps=15, orbit_frames=6, interp_frames=4)
        if not synthetic:
            return cls(personalize_steps=500, anchor_steps=300, eval_steps=200, orbit_frames=60,
                       interp_frames=16)
        return cls()


@dataclass
class DemoResult:
    out_dir: Path
    report: Path
    base: str
    seconds: float
    files: dict[str, Path] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    steps: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    export: dict[str, Any] = field(default_factory=dict)
    base_origin: str = "given"  # shipped, cached, rebuilt (synthetic) or given (--base)

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "report": str(self.report), "base": self.base,
                "base_origin": self.base_origin,
                "seconds": round(self.seconds, 1), "files": {k: str(v) for k, v in self.files.items()},
                "metrics": self.metrics, "stages": self.steps, "export": self.export}


def default_out_dir() -> Path:
    from my3dgen_cli import paths

    return paths.data_dir() / "demo"


# --- the synthetic base and person ---------------------------------------------------------------


def demo_base(fast: bool, out: Output, rebuild: bool = False) -> tuple[str, Path, str]:
    """(base name, person adapter path, origin): the shipped pair, or one fitted from the recipe.

    origin is "shipped" (the zoo entries `demo-tiny-v2` and `demo-tiny-v2-person`, packaged in the
    wheel: copied into the cache and checked against their sha256, no training), "cached" (a local
    base of that name with its person, from an earlier my3dgen that built it in the first demo: it
    shadows the zoo entry of the same name, so it is the one `--identity demo` finds) or "rebuilt"
    (`--rebuild-base`: fitted now from demo/base.py's recipe, `--fast` with its shorter step counts,
    and cached as `demo-tiny-v2[-fast]-rebuilt`).
    """
    from my3dgen_cli import zoo
    from my3dgen_cli.demo import base as db
    from my3dgen_cli.generators import local_bases_dir

    if rebuild:
        name = db.rebuilt_name(fast)
        return name, build_demo_pair(name, db.FitConfig.fast() if fast else db.FitConfig(), out), "rebuilt"
    name = db.SHIPPED_BASE
    person = local_bases_dir() / f"{name}.person.safetensors"
    if (local_bases_dir() / f"{name}.safetensors").is_file() and person.is_file():
        return name, person, "cached"
    zoo.resolve_base(name, offline=True)  # package:// sources are local: offline is fine
    return name, zoo.ensure(db.SHIPPED_PERSON, offline=True), "shipped"


def build_demo_pair(name: str, cfg: Any, out: Output) -> Path:
    """Fit the demo base and its hidden person from the recipe; cache them as local base `name` and
    `<name>.person.safetensors` beside it. Returns the person adapter's path."""
    from my3dgen_cli.adapter_file import save_adapter
    from my3dgen_cli.demo import base as db
    from my3dgen_cli.generators import local_bases_dir, open_base, save_local_base

    person = local_bases_dir() / f"{name}.person.safetensors"
    out.info(f"fitting the demo base {name!r} from its recipe (minutes; cached in {local_bases_dir()})")
    with out.progress() as bar:
        tasks: dict[str, Any] = {}
        totals = {"field": cfg.field_steps, "superresolution": cfg.sr_steps, "person": cfg.person_field_steps,
                  "person superresolution": cfg.person_sr_steps}

        def on_step(stage: str, step: int, loss: float) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=totals[stage], status="")
            bar.update(tasks[stage], completed=step + 1, status=f"loss {loss:.4f}")

        G = db.build_demo_base(seed=0, config=cfg, on_step=on_step)
        save_local_base(G, name)
        G, ref = open_base(name)  # exactly the saved weights
        z, ws = db.person_latent(G)
        db.fit_person(G, z, ws, config=cfg, on_step=on_step)
    save_adapter(G, person, name, ref.sha256, {"person_seed": 3, "note": "the demo's hidden person; not an identity"})
    return person


def synthetic_photos(base: str, person_adapter: Path, photo_dir: Path) -> tuple[Any, Any]:
    """Render the hidden person: (training Photos, held-out Photos); PNGs + dataset.json written."""
    from my3dgen_cli.adapter_file import load_adapter
    from my3dgen_cli.demo import base as db
    from my3dgen_cli.eg3d.camera import camera_rig
    from my3dgen_cli.generators import open_base
    from my3dgen_cli.personalize.photos import Photos

    G, ref = open_base(base)
    _, ws = db.person_latent(G)
    load_adapter(G, person_adapter, base_sha256=ref.sha256)
    angles = [*zip(TRAIN_YAWS, TRAIN_PITCHES, strict=True), *HELD_OUT]
    cams = camera_rig(G).lookat([a for a, _ in angles], [b for _, b in angles])
    with torch.no_grad():
        images = G.eval().synthesis(ws.expand(len(angles), -1, -1), cams, noise_mode="const")["image"]
    names = [f"train{k:02d}" for k in range(len(TRAIN_YAWS))] + [f"heldout{k}" for k in range(len(HELD_OUT))]
    _write_dataset(photo_dir, images, cams, names)
    n = len(TRAIN_YAWS)
    return Photos(images[:n], cams[:n], names[:n]), Photos(images[n:], cams[n:], names[n:])


def _write_dataset(folder: Path, images: torch.Tensor, cams: torch.Tensor, names: list[str]) -> None:
    from my3dgen_cli.media import to_uint8, write_png

    folder.mkdir(parents=True, exist_ok=True)
    for image, name in zip(images, names, strict=True):
        write_png(folder / f"{name}.png", to_uint8(image))
    labels = [[f"{n}.png", c.tolist()] for n, c in zip(names, cams, strict=True)]
    write_text_atomic(folder / "dataset.json", json.dumps({"labels": labels}))


# --- the pipeline ------------------------------------------------------------------------------


def check_demo_identity(force: bool) -> None:
    """Refuse to replace an identity named `demo` that the demo did not make (its adapter lacks MADE_BY).

    An empty or absent folder is free; anything else (the user's identity, a broken or unfinished one)
    is kept unless `force`.
    """
    from my3dgen_cli.adapter_file import read_adapter
    from my3dgen_cli.identity import identity_paths

    ip = identity_paths(IDENTITY)
    if force or not ip.root.is_dir() or not any(ip.root.iterdir()):
        return
    made_by = None
    if ip.adapter.is_file():
        try:
            extra = read_adapter(ip.adapter).extra
        except (My3DGenError, ValueError, KeyError, TypeError):  # unreadable: not provably the demo's
            extra = None
        made_by = extra.get("made_by") if isinstance(extra, dict) else None
    if made_by != MADE_BY:
        raise UserInputError(f"identity {IDENTITY!r} ({ip.root}) was not made by the demo; rename it or pass "
                             "--force to replace it")


class _Stages:
    """Times the demo's stages (seconds, for the report and --json) and says each one as it ends."""

    def __init__(self, out: Output) -> None:
        self.out, self.seconds, self.t0 = out, {}, time.perf_counter()
        self._last = self.t0

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._last, 1)
        self.out.info(f"{name}: {self.seconds[name]:.1f} s")
        self._last = now


DEMO_MARKER = ".my3dgen-demo"  # written into every report folder: only such a folder is ever replaced


@contextmanager
def _report_folder(out_dir: Path | None) -> Iterator[Path]:
    """The report folder, new and empty while the demo writes it; an earlier report there is kept until it is done.

    Only a folder an earlier demo wrote (its marker file; in the default place, a report.html of a version
    before the marker) is replaced; any other non-empty folder is refused. The earlier report waits beside it
    (`.NAME.old-PID`) and is deleted once this run has finished, or put back if the run fails or is stopped,
    so a failed demo never costs the report (or photos kept in it) that was there before, nor leaves half a one.
    """
    default = default_out_dir()
    out_dir = Path(out_dir) if out_dir is not None else default
    with held_lock(out_dir.with_name(f".{out_dir.name}.lock"), f"{out_dir} is being written"):
        yield from _replace_report_folder(out_dir, default)


def _replace_report_folder(out_dir: Path, default: Path) -> Iterator[Path]:
    """`_report_folder`'s work, with the folder's lock held (two demos into one folder once moved each other's)."""
    kept = None
    if out_dir.exists():
        ours = (out_dir / DEMO_MARKER).is_file() or (out_dir == default and (out_dir / "report.html").is_file())
        if not ours and any(out_dir.iterdir()):
            raise UserInputError(f"{out_dir} is not empty and was not written by the demo; choose another -o "
                                 "(the demo replaces only its own report folders)")
        kept = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(kept)
    try:
        out_dir.mkdir(parents=True)
        (out_dir / DEMO_MARKER).write_text("a my3dgen demo report folder; `my3dgen demo` replaces it\n",
                                           encoding="utf-8")
        yield out_dir
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)  # no half-written report is left behind
        if kept is not None:
            kept.rename(out_dir)
            kept = None
        raise
    finally:
        if kept is not None:
            shutil.rmtree(kept, ignore_errors=True)


def _user_photos(base: str, photos: Path) -> tuple[Any, Any]:
    """(training Photos, held-out Photos) of `--photos` (the last one held out), read and checked with `--base`
    before the report folder is touched: they may live in an earlier report's folder."""
    from my3dgen_cli.generators import resolve_base_path
    from my3dgen_cli.personalize.photos import Photos, read_photos

    resolve_base_path(base, offline=True)  # the demo never downloads
    given = read_photos(photos)
    if given.images.shape[0] < 3:
        raise UserInputError(f"--photos: got {given.images.shape[0]} usable photos, expected 3 or more")
    train = Photos(given.images[:-1], given.cameras[:-1], given.names[:-1], given.skipped)
    return train, Photos(given.images[-1:], given.cameras[-1:], given.names[-1:])


def run_demo(
    out_dir: Path | None = None,
    fast: bool = False,
    base: str | None = None,
    photos: Path | None = None,
    device: str = "cpu",
    output: Output | None = None,
    rebuild_base: bool = False,
    force: bool = False,
) -> DemoResult:
    """Run the pipeline into `out_dir` (default: <data>/demo, replaced) and write report.html.

    The synthetic base is the shipped one unless `rebuild_base` (fit it from the recipe first).
    The identity `demo` is replaced only when an earlier demo made it, or with `force`.
    """
    out = output or Output("quiet")
    if (base is None) != (photos is None):
        raise UserInputError("--base and --photos go together: a real base needs real photos (or give neither)")
    if rebuild_base and base is not None:
        raise UserInputError("--rebuild-base rebuilds the synthetic demo base; it does not go with --base")
    check_demo_identity(force)
    given = None if base is None or photos is None else _user_photos(base, photos)
    with _report_folder(out_dir) as folder:
        return _run(folder, fast, base, given, rebuild_base, device, out)


def _run(out_dir: Path, fast: bool, base: str | None, given: tuple[Any, Any] | None, rebuild_base: bool, device: str,
         out: Output) -> DemoResult:
    """The demo's stages into the new report folder `out_dir` (`run_demo` checked the arguments)."""
    from my3dgen_cli.demo import stages as st
    from my3dgen_cli.generators import open_generator
    from my3dgen_cli.identity import identity_anchors
    from my3dgen_cli.personalize.pipeline import LossNets, PersonalizeConfig, personalize

    synthetic = given is None
    settings = DemoSettings.for_run(fast, synthetic)
    timer = _Stages(out)
    if given is None:
        base, person, origin = demo_base(fast, out, rebuild=rebuild_base)
        out.info(f"demo base: {base} ({origin})")
        train, held = synthetic_photos(base, person, out_dir / "photos")
    else:
        (train, held), origin = given, "given"
    files: dict[str, Path] = {"photos": out_dir / "photos"} if synthetic else {}
    timer.done("base and photos")

    # the tiny synthetic photos are projected in one batch (a batch of 10 keeps both cores of a small CPU busy)
    config = PersonalizeConfig(steps=settings.personalize_steps, anchor_steps=settings.anchor_steps,
                               anchor_batch=train.images.shape[0] if synthetic else PersonalizeConfig.anchor_batch,
                               sym_loss="id", checkpoint_every=0)
    nets = LossNets.load(config, offline=True, warn=False)  # the demo never downloads: one note, below
    missing = [name for name, net in (("lpips-vgg16", nets.anchor_lpips), ("lpips-alexnet", nets.train_lpips),
                                      ("arcface-ir-se50", nets.identity)) if net is None]
    if missing:
        stand_in = "LPIPS (for the symmetry term)" if missing == ["arcface-ir-se50"] else "pixel distances"
        out.info(f"losses: {', '.join(missing)} not cached and the demo runs offline, so {stand_in} stand in; "
                 f"`my3dgen fetch {' '.join(missing)}` adds them")
    try:
        ident = personalize(train, IDENTITY, config, base=base, device=device, nets=nets, force=True, offline=True,
                            output=out, made_by=MADE_BY)
    except My3DGenError as err:
        if err.exit_code != 130:
            raise
        # personalize's own message says "--resume", which the demo does not take: it always starts over
        raise DemoInterrupted("interrupted while personalizing the demo identity; run `my3dgen demo` again "
                              "to start over") from None
    timer.done("personalize")

    # eval inverts every held-out view under the base and the new prior; the first one's inversion under the
    # prior is the demo's inverted photo (same steps, so it is not done twice)
    evaluation, files["metrics"] = st.evaluate_held_out(IDENTITY, held, settings.eval_steps, device, nets, out_dir)
    G, ref, _ = open_generator(identity=IDENTITY, device=device)
    anchors, anchor_cams = identity_anchors(IDENTITY, next(G.parameters()).device)
    inv, target, files["latent"] = st.held_out_latent(evaluation, ref.name, IDENTITY, held, G.img_resolution, out_dir)
    timer.done("eval")
    files.update(st.orbit(G, inv.ws, settings.orbit_frames, out_dir))
    timer.done("orbit")
    files["interpolation"] = st.interpolate(G, anchors, anchor_cams, settings.interp_frames, out_dir)
    timer.done("interpolate")
    export_info = st.export_onnx(IDENTITY, out_dir / "demo.onnx", out)
    if "path" in export_info:
        files["onnx"] = Path(export_info["path"])
    timer.done("export")

    files.update(_identity_files(G, target, inv.image, out_dir))
    result = DemoResult(out_dir, out_dir / "report.html", base, time.perf_counter() - timer.t0, files,
                        evaluation.to_dict(), timer.seconds, export_info, origin)
    result.steps["total"] = round(result.seconds, 1)
    write_text_atomic(result.report, render_report(result, synthetic, ident.to_dict(), evaluation, inv.psnr,
                                                   held.names[0], settings))
    return result


def _identity_files(G: Any, target: torch.Tensor, inverted: torch.Tensor, out_dir: Path) -> dict[str, Path]:
    """The report's copies of the identity's loss curve and preview grid, and the inversion side by side."""
    from my3dgen_cli import media
    from my3dgen_cli.demo.stages import upscaled
    from my3dgen_cli.identity import identity_paths

    ip = identity_paths(IDENTITY)
    shutil.copyfile(ip.loss_plot, out_dir / "loss.png")
    shutil.copyfile(ip.previews / "grid.png", out_dir / "training_grid.png")
    inversion = media.write_png(out_dir / "inversion.png", media.grid(
        [upscaled(media.to_uint8(x), G.img_resolution) for x in (target[0], inverted[0])]))
    return {"loss_plot": out_dir / "loss.png", "previews": out_dir / "training_grid.png", "inversion": inversion,
            "identity": ip.root}
