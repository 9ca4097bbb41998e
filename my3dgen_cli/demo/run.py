"""`my3dgen demo`: the whole pipeline on a fresh machine (no network, no GPU) and an HTML report.

    result = run_demo(out_dir, fast=False)      # report at result.report

Without `--base`, the base is the demo's tiny synthetic generator (demo/base.py: the tiny EG3D
fitted to simple 3-D heads; it ships inside the wheel as the zoo entry `demo-tiny-v2`, so only the
adapter is trained here; `--rebuild-base` fits it again from the recipe), and the training photos
are renders of a hidden "person" (the base + a low-rank change, shipped beside it) from 10 known
cameras, with 2 more views held out. With `--base NAME --photos DIR` the same steps run on real
weights and photos (the last photo is held out). Then the real pipeline runs:

    personalize (identity `demo`) -> invert a held-out view -> orbit -> interpolate two photos
    -> export ONNX -> eval (base vs personalized on the held-out views) -> report.html
"""

from __future__ import annotations

import html
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from my3dgen_cli.errors import My3DGenError, UserInputError
from my3dgen_cli.fileio import write_text_atomic
from my3dgen_cli.output import Output

IDENTITY = "demo"
MADE_BY = "my3dgen demo"  # the demo's mark in its adapter's metadata: only an identity with it is replaced
TRAIN_YAWS = (-45.0, -35.0, -25.0, -15.0, -5.0, 5.0, 15.0, 25.0, 35.0, 45.0)
TRAIN_PITCHES = (0.0, 8.0, -6.0, 4.0, -3.0, 6.0, -8.0, 3.0, -4.0, 0.0)
HELD_OUT = ((-60.0, 5.0), (55.0, -5.0))
ORIGINS = {"shipped": "shipped with my3dgen, checked against its zoo sha256; not trained here",
           "cached": "cached by an earlier my3dgen", "rebuilt": "fitted in this run from the recipe (--rebuild-base)"}
SECTIONS = ("about", "photos", "training", "inversion", "orbit", "interpolation", "metrics", "export", "files")


@dataclass(frozen=True)
class DemoSettings:
    """Step counts of one demo run (`fast` for the test suite)."""

    personalize_steps: int = 150
    anchor_steps: int = 60
    invert_steps: int = 80
    eval_steps: int = 60
    orbit_frames: int = 24
    interp_frames: int = 8

    @classmethod
    def for_run(cls, fast: bool, synthetic: bool) -> DemoSettings:
        if fast:
            return cls(personalize_steps=30, anchor_steps=15, invert_steps=20, eval_steps=15, orbit_frames=6,
                       interp_frames=4)
        if not synthetic:
            return cls(personalize_steps=500, anchor_steps=300, invert_steps=300, eval_steps=200, orbit_frames=60,
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
    from my3dgen_cli.personalize.pipeline import Photos

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
    from my3dgen_cli import media
    from my3dgen_cli.personalize.pipeline import LossNets, PersonalizeConfig, personalize, read_photos

    out = output or Output("quiet")
    if (base is None) != (photos is None):
        raise UserInputError("--base and --photos go together: a real base needs real photos (or give neither)")
    if rebuild_base and base is not None:
        raise UserInputError("--rebuild-base rebuilds the synthetic demo base; it does not go with --base")
    check_demo_identity(force)
    synthetic = base is None
    settings = DemoSettings.for_run(fast, synthetic)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir()
    if out_dir.exists():
        if not (out_dir / "report.html").is_file() and any(out_dir.iterdir()):
            raise UserInputError(f"{out_dir} is not empty and holds no demo report; choose another -o")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    stages: dict[str, float] = {}
    files: dict[str, Path] = {}

    def stage(name: str, since: float) -> float:
        now = time.perf_counter()
        stages[name] = round(now - since, 1)
        out.info(f"{name}: {stages[name]:.1f} s")
        return now

    t = t0
    origin = "given"
    if synthetic:
        base, person, origin = demo_base(fast, out, rebuild=rebuild_base)
        out.info(f"demo base: {base} ({origin})")
        train, held = synthetic_photos(base, person, out_dir / "photos")
        files["photos"] = out_dir / "photos"
    else:
        given = read_photos(photos)
        if given.images.shape[0] < 3:
            raise UserInputError(f"--photos: got {given.images.shape[0]} usable photos, expected 3 or more")
        from my3dgen_cli.personalize.pipeline import Photos

        train = Photos(given.images[:-1], given.cameras[:-1], given.names[:-1], given.skipped)
        held = Photos(given.images[-1:], given.cameras[-1:], given.names[-1:])
    t = stage("base and photos", t)

    config = PersonalizeConfig(steps=settings.personalize_steps, anchor_steps=settings.anchor_steps,
                               sym_loss="id", checkpoint_every=0)
    nets = LossNets.load(config, offline=True, output=out)
    ident = personalize(train, IDENTITY, config, base=base, device=device, nets=nets, force=True, offline=True,
                        output=out, made_by=MADE_BY)
    t = stage("personalize", t)

    from my3dgen_cli.generators import open_generator
    from my3dgen_cli.identity import Latent, identity_anchors, identity_paths, write_latent
    from my3dgen_cli.personalize.anchors import resize
    from my3dgen_cli.use.invert import InvertConfig, invert_image

    G, ref, _ = open_generator(identity=IDENTITY, device=device)
    dev = next(G.parameters()).device
    anchors, anchor_cams = identity_anchors(IDENTITY, dev)
    res = G.img_resolution
    target = resize(held.images[:1].float(), res).to(dev)
    inv = invert_image(G, target, held.cameras[:1].to(dev), anchors=anchors,
                       config=InvertConfig(steps=settings.invert_steps, space="w", lpips_weight=0.0))
    files["latent"] = write_latent(out_dir / "heldout.latent", Latent(inv.ws, inv.camera, ref.name, IDENTITY, "w"))
    t = stage("invert", t)

    from my3dgen_cli.eg3d.camera import camera_rig
    from my3dgen_cli.use.render import orbit_angles, render_views

    rig = camera_rig(G)
    angles = orbit_angles(settings.orbit_frames)
    orbit = render_views(G, inv.ws, rig.lookat([a for a, _ in angles], [b for _, b in angles]))
    frames = [media.to_uint8(im) for im in orbit.images]
    files["orbit_gif"] = media.write_gif(out_dir / "orbit.gif", frames, fps=12)
    sheet_angles = [-50.0, -25.0, 0.0, 25.0, 50.0]
    sheet = render_views(G, inv.ws, rig.lookat(sheet_angles, 0.0)).images
    files["contact_sheet"] = media.write_png(out_dir / "contact_sheet.png",
                                             media.grid([_up(media.to_uint8(im), res) for im in sheet]))
    t = stage("orbit", t)

    from my3dgen_cli.use.interpolate import interpolate_cameras, interpolate_latents

    a, b = 0, anchors.shape[0] - 1
    ws_path = interpolate_latents([anchors[a:a + 1], anchors[b:b + 1]], settings.interp_frames, "slerp")
    cam_path = interpolate_cameras(anchor_cams[[a, b]].cpu(), settings.interp_frames, rig=rig)
    with torch.no_grad():
        morph = [G.synthesis(w[None].to(dev), c[None].to(dev), noise_mode="const")["image"][0]
                 for w, c in zip(ws_path, cam_path, strict=True)]
    files["interpolation"] = media.write_png(out_dir / "interpolation.png",
                                             media.grid([_up(media.to_uint8(m), res) for m in morph]))
    t = stage("interpolate", t)

    export_info = _export(out_dir / "demo.onnx", out)
    if "path" in export_info:
        files["onnx"] = Path(export_info["path"])
    t = stage("export", t)

    from my3dgen_cli.use.evaluate import evaluate

    lpips = nets.train_lpips
    evaluation = evaluate(IDENTITY, held.images, held.cameras, held.names, steps=settings.eval_steps, device=device,
                          lpips=lpips, arcface=nets.identity)
    files["metrics"] = out_dir / "metrics.json"
    write_text_atomic(files["metrics"], json.dumps(evaluation.to_dict(), indent=1))
    t = stage("eval", t)

    ip = identity_paths(IDENTITY)
    files["loss_plot"] = _copy(ip.loss_plot, out_dir / "loss.png")
    files["previews"] = _copy(ip.previews / "grid.png", out_dir / "training_grid.png")
    files["inversion"] = media.write_png(out_dir / "inversion.png", media.grid(
        [_up(media.to_uint8(x), res) for x in (target[0], inv.image[0])]))
    files["identity"] = ip.root
    result = DemoResult(out_dir, out_dir / "report.html", base, time.perf_counter() - t0, files,
                        evaluation.to_dict(), stages, export_info, origin)
    result.steps["total"] = round(result.seconds, 1)
    write_text_atomic(result.report, render_report(result, synthetic, ident.to_dict(), evaluation, inv.psnr,
                                                   held.names[0], settings))
    return result


def _up(image: np.ndarray, res: int, size: int = 128) -> np.ndarray:
    """Nearest-neighbour enlargement of small demo renders so the report shows them at a visible size."""
    k = max(1, size // res)
    return np.repeat(np.repeat(image, k, axis=0), k, axis=1) if k > 1 else image


def _copy(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


def _export(path: Path, out: Output) -> dict[str, Any]:
    """ONNX export of the demo identity, checked by onnxruntime; a skip (with its reason) without it."""
    try:
        from my3dgen_cli.use import export as lib

        G, ref, _, merge_diff = lib.merged_generator(identity=IDENTITY, device="cpu", offline=True)
        check = lib.export_onnx(G, path, metadata={"identity": IDENTITY, "base": ref.name})
    except (My3DGenError, ImportError) as err:
        out.warn(f"ONNX export skipped: {err}")
        return {"skipped": str(err)}
    return {"path": str(path), "size": path.stat().st_size, "max_abs_diff": check.max_abs_diff,
            "merge_max_abs_diff": merge_diff}


# --- the report --------------------------------------------------------------------------------


def render_report(result: DemoResult, synthetic: bool, ident: dict[str, Any], evaluation: Any, invert_psnr: float,
                  held_name: str, settings: DemoSettings) -> str:
    """report.html: one self-contained page linking the files next to it (relative paths)."""
    def rel(key: str) -> str:
        return html.escape(str(Path(result.files[key]).relative_to(result.out_dir)))

    def img(key: str, alt: str) -> str:
        return f'<img src="{rel(key)}" alt="{html.escape(alt)}">'

    if synthetic:
        about = ("<p><b>A tiny synthetic base, not a face model.</b> The base is the tiny EG3D (64 px images, "
                 "32 px neural render) fitted in a minute or two of CPU to simple 3-D heads (an ellipsoid with a "
                 "nose, hair, eyes and a mouth; colours and proportions vary with z). The &ldquo;person&rdquo; is "
                 "this base plus a hidden low-rank change (other colours, a wider face, a bigger nose), seen in 10 "
                 "training views with known cameras; 2 more views are held out. Everything below is the real "
                 f"pipeline on it.</p><p>Base <code>{html.escape(result.base)}</code> "
                 f"({html.escape(ORIGINS[result.base_origin])}).</p>")
    else:
        about = f"<p>Base <code>{html.escape(result.base)}</code> on your photos; the last photo is held out.</p>"
    ex = result.export
    export_html = (f"<p>ONNX: <code>{rel('onnx')}</code> ({ex['size'] / 2**20:.1f} MiB); onnxruntime vs "
                   f"PyTorch max abs diff {ex['max_abs_diff']:.2e}.</p>" if "path" in ex else
                   f"<p>ONNX export skipped: {html.escape(ex.get('skipped', ''))}</p>")
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td><code>{html.escape(str(v))}</code></td></tr>"
                   for k, v in result.files.items())
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in result.steps.items())
    table = html.escape(evaluation.table())
    better = ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in evaluation.better().items())
    photos_html = (f'<p>{"".join(_thumb(p) for p in sorted((result.out_dir / "photos").glob("train*.png")))}</p>'
                   if synthetic else "<p>Your photos (see the training grid below).</p>")
    parts = {
        "about": ("What this is", about + f"<p>Stages: {html.escape(timing)}.</p>"),
        "photos": ("Training photos", photos_html),
        "training": ("Personalization", f"<p>Identity <code>{IDENTITY}</code>: {ident['parameters']:,} adapter "
                     f"parameters ({ident['ratio']}x fewer than the generator), {ident['steps']} steps, final loss "
                     f"{ident['final_loss']:.4f}.</p>{img('loss_plot', 'loss curve')}"
                     f"{img('previews', 'photo vs personalized render')}"),
        "inversion": ("Inverting a held-out view", f"<p>{html.escape(held_name)} (left) and its inversion under the "
                      f"personalized prior (right), {settings.invert_steps} steps, PSNR {invert_psnr:.2f} dB; latent "
                      f"in <code>{rel('latent')}</code>.</p>{img('inversion', 'held-out view and inversion')}"),
        "orbit": ("Orbit", f"{img('orbit_gif', 'orbit')}<p>{img('contact_sheet', 'yaw -50 to 50')}</p>"),
        "interpolation": ("Interpolating two photos", f"<p>First to last training photo (slerp of their anchors, "
                          f"cameras interpolated).</p>{img('interpolation', 'interpolation strip')}"),
        "metrics": ("Metrics: base vs personalized", f"<p>Held-out views inverted under each model "
                    f"({settings.eval_steps} steps). Personalized better: {html.escape(better)}.</p>"
                    f"<pre>{table}</pre><p>All numbers: <code>{rel('metrics')}</code>.</p>"),
        "export": ("Export", export_html),
        "files": ("Where files went", f"<table>{rows}</table>"),
    }
    body = "".join(f'<section id="{key}"><h2>{title}</h2>{content}</section>' for key, (title, content) in
                   ((k, parts[k]) for k in SECTIONS))
    style = ("body{font-family:sans-serif;max-width:900px;margin:2em auto;color:#222}img{image-rendering:pixelated;"
             "margin:2px}pre{background:#f4f4f4;padding:8px}td{padding:2px 8px}")
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>my3dgen demo</title><style>{style}</style>"
            f"</head><body><h1>my3dgen demo</h1>{body}</body></html>\n")


def _thumb(path: Path) -> str:
    return f'<img src="photos/{html.escape(path.name)}" alt="{html.escape(path.stem)}" width="96">'
