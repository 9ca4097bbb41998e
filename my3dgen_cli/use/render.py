"""Rendering latents from many cameras: angle lists, orbits, batched views, depth.

    ws = latent_from_seed(G, 7, truncation=0.7)            # [1, num_ws, w_dim]
    cams, angles = cameras_for(parse_angles("-30:30:7"), [0.0], G)   # on G's own camera pivot/radius
    views = render_views(G, ws, cams, batch=4)
    views.images   # [N, 3, H, W] in [-1, 1]   views.depth  # [N, 1, r, r] in scene units

The backbone runs once per latent (`G.planes`); only the renderer and superresolution run per
view. Angles are degrees in camera.py's convention (yaw 0, pitch 0 = frontal; yaw > 0 shows the
subject's left cheek; pitch > 0 looks down on the face), on the base's camera rig (the pivot and
radius of its rendering_kwargs: `camera_rig(G)`). Sampling is deterministic, so the same latent
and camera always give the same pixels.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from my3dgen_cli.eg3d.camera import CameraRig, camera_rig, check_label
from my3dgen_cli.eg3d.renderer import sampling_layout
from my3dgen_cli.errors import UserInputError
from my3dgen_cli.output import Output
from my3dgen_cli.use.sources import ModelChoice

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)"
MAX_DEGREES = 180.0  # every angle option (render, interpolate, invert) stays within [-180, 180]
MAX_ANGLES = 10_000  # views per start:stop:count (a typo such as -30:30:10000000 would fill the memory)


def parse_angles(spec: str, name: str = "angle") -> list[float]:
    """Degrees from "30", "-30,0,30" or "start:stop:count" (inclusive, count >= 1); parts can mix."""
    values: list[float] = []
    for part in str(spec).split(","):
        part = part.strip()
        if re.fullmatch(_NUMBER, part):
            values.append(float(part))
            continue
        m = re.fullmatch(rf"({_NUMBER}):({_NUMBER}):(\d+)", part)
        if not m:
            raise UserInputError(f"--{name}: got {part!r}, expected degrees like 30, -30,0,30 or -30:30:7")
        start, stop, count = float(m.group(1)), float(m.group(2)), int(m.group(3))
        if not 1 <= count <= MAX_ANGLES:
            raise UserInputError(f"--{name}: got count {count} in {part!r}, expected 1..{MAX_ANGLES}")
        values += [start] if count == 1 else [start + (stop - start) * k / (count - 1) for k in range(count)]
    for v in values:
        check_degrees(v, name)
    return values


def check_degrees(value: float, name: str = "angle") -> float:
    """One angle limit for every command: finite and within [-MAX_DEGREES, MAX_DEGREES]."""
    if not math.isfinite(value) or abs(value) > MAX_DEGREES:
        raise UserInputError(f"--{name}: got {value:g}, expected degrees within [-{MAX_DEGREES:g}, {MAX_DEGREES:g}]")
    return value


def parse_sweep(spec: str, name: str = "yaw") -> tuple[float, float]:
    """An angle sweep "FROM:TO" in degrees (interpolate's --yaw), with parse_angles' number form and limits."""
    m = re.fullmatch(rf"\s*({_NUMBER})\s*:\s*({_NUMBER})\s*", str(spec))
    if not m:
        raise UserInputError(f"--{name}: got {spec!r}, expected FROM:TO degrees like -30:30")
    return check_degrees(float(m.group(1)), name), check_degrees(float(m.group(2)), name)


def cameras_for(yaws: list[float], pitches: list[float], rig: CameraRig | nn.Module | None = None
                ) -> tuple[torch.Tensor, list[tuple[float, float]]]:
    """Every (yaw, pitch) pair, pitch-major: (cameras [N, 25], angles).

    rig: a generator (its own pivot and radius), a CameraRig, or None for FFHQ's.
    """
    pairs = [(y, p) for p in pitches for y in yaws]
    cams = camera_rig(rig).lookat([y for y, _ in pairs], [p for _, p in pairs])
    return cams, pairs


def orbit_angles(frames: int, yaw_range: float = 30.0, pitch_range: float = 10.0) -> list[tuple[float, float]]:
    """A closed loop of `frames` views: yaw = A sin(2 pi t), pitch = B cos(2 pi t) (EG3D's video path)."""
    if frames < 1:
        raise UserInputError(f"--orbit: got {frames} frames, expected 1 or more")
    return [(yaw_range * math.sin(2 * math.pi * k / frames), pitch_range * math.cos(2 * math.pi * k / frames))
            for k in range(frames)]


@torch.no_grad()
def latent_from_seed(G: nn.Module, seed: int, truncation: float = 0.7) -> torch.Tensor:
    """ws [1, num_ws, w_dim] for a seed: z ~ N(0, I) from torch.Generator(seed), conditioned on G's frontal camera."""
    device = G.backbone.mapping.w_avg.device
    gen = torch.Generator().manual_seed(int(seed))
    z = torch.randn(1, G.z_dim, generator=gen).to(device)
    return G.mapping(z, camera_rig(G).frontal().to(device), truncation_psi=truncation)


@dataclass
class Views:
    images: torch.Tensor  # [N, 3, H, W] in [-1, 1]
    depth: torch.Tensor  # [N, 1, r, r] scene units along the ray
    cameras: torch.Tensor  # [N, 25]


@torch.no_grad()
def render_views(G: nn.Module, ws: torch.Tensor, cameras: torch.Tensor, batch: int = 8,
                 planes: torch.Tensor | None = None, on_batch=None, *, amp: str | bool = "off",
                 compile: bool = False, channels_last: bool | None = None) -> Views:
    """Render one latent ws [1, num_ws, w_dim] from cameras [N, 25], `batch` views per pass.

    amp: "off" (exact fp32), "bf16" or "fp16" (CUDA) autocast (speed.autocast); compile: run a
    torch.compile'd synthesis (built once per generator; pays off from a few dozen views). Outputs
    stay on the device until the end (one copy to the host, no sync per batch). channels_last: NHWC
    convolutions (same values up to float order); None = on with autocast on CUDA, and in fp32 for a
    full-size generator on a CPU whose convolutions measured faster so (speed.use_channels_last).
    """
    from my3dgen_cli.speed import autocast, compiled_synthesis, use_channels_last

    check_label(cameras)
    if ws.ndim != 3 or ws.shape[0] != 1:
        raise ValueError(f"ws: got shape {list(ws.shape)}, expected [1, num_ws, w_dim]")
    if batch < 1:
        raise UserInputError(f"--batch: got {batch}, expected 1 or more")
    cameras = cameras.to(ws.device)
    synth = compiled_synthesis(G) if compile else G.synthesis
    nhwc = use_channels_last(channels_last, ws.device, amp, resolution=G.img_resolution)
    images, depths = [], []
    with autocast(ws.device, amp):
        if planes is None:
            planes = sampling_layout(G.planes(ws, noise_mode="const", channels_last=nhwc))
        for start in range(0, cameras.shape[0], batch):
            c = cameras[start:start + batch]
            n = c.shape[0]
            out = synth(ws.expand(n, -1, -1), c, noise_mode="const", sampling="deterministic",
                        planes=planes.expand(n, -1, -1, -1, -1), channels_last=nhwc)
            images.append(out["image"].float())
            depths.append(out["image_depth"].float())
            if on_batch is not None:
                on_batch(n)
    return Views(torch.cat(images).cpu(), torch.cat(depths).cpu(), cameras.cpu())


def angle_tag(yaw: float, pitch: float) -> str:
    """File-name tag of a view: yaw+030_pitch-010 (integers when the angles are)."""
    def fmt(v: float) -> str:
        return f"{v:+04.0f}" if float(v).is_integer() else f"{v:+06.1f}"

    return f"yaw{fmt(yaw)}_pitch{fmt(pitch)}"


@dataclass(frozen=True)
class RenderPlan:
    """What `my3dgen render` was asked for: the sources, the views and extras, where the files go.

    Sources are latent files, anchors of `model.identity` and seeds (names: the file stem, anchorK,
    seedS). Views: every (yaw, pitch) pair, pitch-major, or each source's stored camera with
    `own_camera`. `out`: a folder (default ./renders) or one .png for one view of one source.
    """

    model: ModelChoice
    latents: tuple[Path, ...] = ()
    anchors: tuple[int, ...] = ()
    seeds: tuple[int, ...] = ()
    truncation: float = 0.7
    yaws: tuple[float, ...] = (0.0,)
    pitches: tuple[float, ...] = (0.0,)
    own_camera: bool = False
    orbit: int | None = None
    fps: float = 24.0
    depth: bool = False
    mesh: Path | None = None
    mesh_res: int = 128
    mesh_level: float = 10.0
    ascii_ply: bool = False
    grid: bool = False
    batch: int = 8
    amp: str = "off"
    compile: bool = False
    channels_last: bool | None = None
    out: Path | None = None
    force: bool = False

    def source_names(self) -> list[str]:
        return ([Path(p).stem for p in self.latents] + [f"anchor{k}" for k in self.anchors]
                + [f"seed{s}" for s in self.seeds])

    def view_tags(self) -> list[str]:
        """File-name tags of one source's views."""
        return ["own"] if self.own_camera else [angle_tag(y, p) for p in self.pitches for y in self.yaws]

    def outputs(self) -> list[tuple[str, Path]]:
        """(kind, path) of every file, in writing order; raises UserInputError for an impossible request."""
        from my3dgen_cli import media

        names = self.source_names()
        if not names:
            raise UserInputError("nothing to render: give --latent FILE, --anchor K (with --identity) or --seed S")
        if len(set(names)) != len(names):
            raise UserInputError(f"two sources share a name ({names}); rename a latent file")
        if self.mesh is not None:
            media.check_mesh_suffix(self.mesh)
        tags = self.view_tags()
        single_file = self.out is not None and self.out.suffix.lower() == ".png"
        if single_file and (len(names) > 1 or len(tags) > 1 or self.depth or self.grid or self.orbit):
            raise UserInputError(f"-o {self.out}: one .png holds one view of one source; give a folder for more")
        folder = (self.out.parent if single_file else self.out) if self.out is not None else Path("renders")
        plan: list[tuple[str, Path]] = []
        for name in names:
            for tag in tags:
                plan.append(("image", self.out if single_file else folder / f"{name}_{tag}.png"))
                if self.depth:
                    plan += [("depth", folder / f"{name}_{tag}_depth.png"),
                             ("depth preview", folder / f"{name}_{tag}_depth_color.png")]
            if self.orbit:
                plan += [("orbit video", folder / f"{name}_orbit.mp4"), ("orbit gif", folder / f"{name}_orbit.gif")]
            if self.mesh is not None:
                mesh = self.mesh.with_name(f"{self.mesh.stem}_{name}{self.mesh.suffix}")
                plan.append(("mesh", self.mesh if len(names) == 1 else mesh))
        if self.grid:
            plan.append(("contact sheet", folder / "grid.png"))
        return plan


@dataclass
class RenderResult:
    base: str
    identity: str | None
    outputs: list[tuple[str, Path]]  # (kind, path) of every file written
    sources: list[dict[str, Any]]  # per source: its views and extras (paths, depth range, mesh size)

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base, "identity": self.identity,
                "outputs": [{"kind": k, "path": str(p)} for k, p in self.outputs], "sources": self.sources}


def run_render(plan: RenderPlan, output: Output | None = None) -> RenderResult:
    """Render every source of `plan` and write its files (all checked free before the model opens)."""
    from my3dgen_cli.fileio import check_free
    from my3dgen_cli.speed import check_amp_on
    from my3dgen_cli.use.sources import check_latent_files

    files = plan.outputs()
    recorded_base = check_latent_files(str(path) for path in plan.latents)
    check_free([p for _, p in files], plan.force)
    G, ref, dev = plan.model.or_base(recorded_base).open()
    check_amp_on(dev, plan.amp)
    sources = _render_sources(plan, G, dev)
    out = output or Output("quiet")
    paths = iter(p for _, p in files)
    sheet, summary = [], []
    with out.progress() as bar:
        task = bar.add_task("rendering", total=len(sources) * (len(plan.view_tags()) + (plan.orbit or 0)), status="")
        for name, ws, cam in sources:
            summary.append(_render_source(plan, G, name, ws, cam, paths, sheet, lambda n: bar.advance(task, n)))
    if plan.grid:
        from my3dgen_cli import media

        media.write_png(next(paths), media.grid(sheet, columns=1 if plan.own_camera else len(plan.yaws)))
    return RenderResult(ref.name, plan.model.identity, files, summary)


def _render_sources(plan: RenderPlan, G: nn.Module, dev: torch.device) -> list[tuple[str, torch.Tensor, Any]]:
    """(name, ws, stored camera or None) of every source, in the plan's order."""
    from my3dgen_cli.use.sources import anchor, resolve_key

    sources = [resolve_key(str(path), G, plan.model.identity, dev, plan.truncation) for path in plan.latents]
    sources += [(f"anchor{k}", *anchor(plan.model.identity, k, dev)) for k in plan.anchors]
    sources += [(f"seed{s}", latent_from_seed(G, s, plan.truncation), None) for s in plan.seeds]
    for name, _, cam in sources:
        if plan.own_camera and cam is None:
            raise UserInputError(f"--own-camera: {name} has no stored camera (seeds have none; an .npy takes it "
                                 "from a dataset.json beside it)")
    return sources


def _render_source(plan: RenderPlan, G: nn.Module, name: str, ws: torch.Tensor, cam: torch.Tensor | None,
                   paths: Iterator[Path], sheet: list[Any], advance: Callable[[int], None]) -> dict[str, Any]:
    """Write one source's views (+ depth), orbit and mesh to the next planned paths; its summary entry."""
    from my3dgen_cli import media
    from my3dgen_cli.speed import use_channels_last

    near, far = float(G.rendering_kwargs["ray_start"]), float(G.rendering_kwargs["ray_end"])
    speed = {"amp": plan.amp, "compile": plan.compile, "channels_last": plan.channels_last}
    # the tri-planes are computed here in fp32 (outside render_views' autocast): the fp32 layout choice
    planes_nhwc = use_channels_last(plan.channels_last, ws.device, "off", resolution=G.img_resolution)
    planes = sampling_layout(G.planes(ws, noise_mode="const", channels_last=planes_nhwc))  # as the render reads them
    cams = cam if plan.own_camera else cameras_for(list(plan.yaws), list(plan.pitches), G)[0]
    views = render_views(G, ws, cams, plan.batch, planes=planes, on_batch=advance, **speed)
    entry: dict[str, Any] = {"source": name, "views": []}
    for k, tag in enumerate(plan.view_tags()):
        img = media.to_uint8(views.images[k])
        png = next(paths)
        media.write_png(png, img)
        sheet.append(img)
        view: dict[str, Any] = {"tag": tag, "image": str(png)}
        if plan.depth:
            d = views.depth[k, 0].numpy()
            dpng, cpng = next(paths), next(paths)
            media.write_png(dpng, media.depth_to_uint16(d, near, far),
                            text={"depth_near": f"{near:g}", "depth_far": f"{far:g}",
                                  "depth_units": "scene units along the ray; 0 = near, 65535 = far"})
            media.write_png(cpng, media.colorize_depth(d))
            view.update(depth=str(dpng), depth_preview=str(cpng), depth_min=float(d.min()), depth_max=float(d.max()))
        entry["views"].append(view)
    if plan.orbit:
        angles = orbit_angles(plan.orbit)
        ocams = camera_rig(G).lookat([a for a, _ in angles], [b for _, b in angles])
        frames = render_views(G, ws, ocams, plan.batch, planes=planes, on_batch=advance, **speed)
        frames_u8 = [media.to_uint8(f) for f in frames.images]
        mp4, gif = next(paths), next(paths)
        media.write_mp4(mp4, frames_u8, plan.fps)
        media.write_gif(gif, frames_u8, plan.fps)
        entry.update(orbit_mp4=str(mp4), orbit_gif=str(gif), orbit_frames=plan.orbit)
    if plan.mesh is not None:
        from my3dgen_cli.use.mesh import extract_mesh

        mesh_path = next(paths)
        try:
            shape = extract_mesh(G, ws, plan.mesh_res, plan.mesh_level)
        except ValueError as err:
            raise UserInputError(f"{name}: {err} (--mesh-level)") from None
        media.write_mesh(mesh_path, shape, binary=not plan.ascii_ply, comment=f"my3dgen {name}")
        entry.update(mesh=str(mesh_path), vertices=len(shape.vertices), faces=len(shape.faces))
    return entry
