"""`my3dgen render`: images, depth maps, orbit videos, contact sheets and meshes of latents."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from my3dgen_cli.cli import command
from my3dgen_cli.commands.options import (
    BATCH_RANGE,
    FPS_RANGE,
    MAX_FRAMES,
    TRUNCATION_RANGE,
    ModelOptions,
    check_free,
    check_latent_files,
    check_range,
    model_options,
    parse_indices,
    written,
)
from my3dgen_cli.errors import UserInputError


@command("render", help="Render a latent, an identity anchor or a seed: views, depth, orbit video, grid, mesh.")
@model_options()
def render(
    opts: ModelOptions,
    latent: Annotated[list[Path] | None, typer.Option(
        "--latent", help="A .latent or .npy (EG3D projector / My3DGen) file; repeatable.")] = None,
    anchor: Annotated[str | None, typer.Option("--anchor", help="Anchor index/indices of --identity: 3, 0,2, 0-3 or "
                                                                "0:3 (ranges include both ends).")] = None,
    seed: Annotated[str | None, typer.Option("--seed", help="Seed(s) of random faces: 7, 1,5,9, 0-3 (EG3D's "
                                                            "gen_samples.py form) or 0:3; ranges include both ends.")
                    ] = None,
    truncation: Annotated[float, typer.Option("--truncation", help="Truncation psi for seeds.")] = 0.7,
    yaw: Annotated[str, typer.Option("--yaw", help="Degrees: 30, -30,0,30 or start:stop:count.")] = "0",
    pitch: Annotated[str, typer.Option("--pitch", help="Degrees, same forms as --yaw.")] = "0",
    own_camera: Annotated[bool, typer.Option("--own-camera", help="Render latents/anchors from their stored camera.")
                          ] = False,
    orbit: Annotated[int | None, typer.Option("--orbit", help="Write an orbit video of N frames (MP4 + GIF).")] = None,
    fps: Annotated[float, typer.Option("--fps", help="Video frame rate.")] = 24.0,
    depth: Annotated[bool, typer.Option("--depth", help="Also write depth maps (16-bit PNG + colour preview).")
                     ] = False,
    mesh: Annotated[Path | None, typer.Option("--mesh", help="Extract a vertex-coloured mesh to this .ply, .obj or "
                                                            ".glb file (.obj/.glb: the mesh extra).")] = None,
    mesh_res: Annotated[int, typer.Option("--mesh-res", help="Marching-cubes grid size per axis.")] = 128,
    mesh_level: Annotated[float, typer.Option("--mesh-level", help="Density level of the surface.")] = 10.0,
    ascii_ply: Annotated[bool, typer.Option("--ascii", help="Write the PLY as text instead of binary.")] = False,
    grid: Annotated[bool, typer.Option("--grid", help="Also write one contact sheet of every view.")] = False,
    batch: Annotated[int, typer.Option("--batch", help="Views rendered per forward pass.")] = 8,
    amp: Annotated[str, typer.Option("--amp", help="Autocast: off (exact fp32), bf16 or fp16 (CUDA; the official "
                                                   "superresolution's precision).")] = "off",
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile the renderer (pays off for orbits).")
                        ] = False,
    channels_last: Annotated[bool | None, typer.Option(
        "--channels-last/--no-channels-last", help="NHWC memory for the convolutions (same images up to float "
        "order; default: on with --amp on CUDA).", show_default=False)] = None,
) -> None:
    from my3dgen_cli import media
    from my3dgen_cli.commands.options import anchor as get_anchor
    from my3dgen_cli.eg3d.camera import camera_rig
    from my3dgen_cli.use.render import (
        angle_tag,
        cameras_for,
        latent_from_seed,
        orbit_angles,
        parse_angles,
        render_views,
    )

    output = opts.output()
    if amp not in ("off", "bf16", "fp16"):
        raise UserInputError(f"--amp: got {amp!r}, expected off, bf16 or fp16")
    if not (latent or anchor or seed):
        raise UserInputError("nothing to render: give --latent FILE, --anchor K (with --identity) or --seed S")
    yaws, pitches = parse_angles(yaw, "yaw"), parse_angles(pitch, "pitch")
    anchors = parse_indices(anchor, "--anchor") if anchor else []
    seeds = parse_indices(seed, "--seed") if seed else []
    if mesh is not None:
        media.check_mesh_suffix(mesh)
    check_range("--truncation", truncation, *TRUNCATION_RANGE)
    check_range("--orbit", orbit, 2, MAX_FRAMES)
    check_range("--fps", fps, *FPS_RANGE)
    check_range("--mesh-res", mesh_res, 8, 512)
    check_range("--mesh-level", mesh_level)
    check_range("--batch", batch, *BATCH_RANGE)

    check_latent_files(str(path) for path in latent or [])
    G, ref, dev = opts.open()
    if amp == "fp16" and dev.type != "cuda":
        raise UserInputError(f"--amp fp16: needs CUDA, got --device {dev.type} (use bf16 there)")
    sources = []  # (name, ws, stored camera or None)
    for path in latent or []:
        from my3dgen_cli.commands.options import resolve_key

        sources.append(resolve_key(str(path), G, opts.identity, dev, truncation))
    for k in anchors:
        sources.append((f"anchor{k}", *get_anchor(opts.identity, k, dev)))
    for s in seeds:
        sources.append((f"seed{s}", latent_from_seed(G, s, truncation), None))
    names = [name for name, _, _ in sources]
    if len(set(names)) != len(names):
        raise UserInputError(f"two sources share a name ({names}); rename a latent file")

    # Plan every output path first, so nothing is written when one of them is taken.
    single_file = opts.out is not None and opts.out.suffix.lower() == ".png"
    n_views = 1 if own_camera else len(yaws) * len(pitches)
    if single_file and (len(sources) > 1 or n_views > 1 or depth or grid or orbit):
        raise UserInputError(f"-o {opts.out}: one .png holds one view of one source; give a folder for more")
    folder = (opts.out.parent if single_file else opts.out) if opts.out is not None else Path("renders")
    plan: list[tuple[str, Path]] = []
    views_plan = []
    for name, _, cam in sources:
        if own_camera:
            if cam is None:
                raise UserInputError(f"--own-camera: {name} has no stored camera (seeds have none; an .npy takes it "
                                      "from a dataset.json beside it)")
            pairs = [("own", None)]
        else:
            pairs = [(angle_tag(y, p), (y, p)) for p in pitches for y in yaws]
        for tag, _ in pairs:
            png = opts.out if single_file else folder / f"{name}_{tag}.png"
            plan.append(("image", png))
            if depth:
                plan += [("depth", folder / f"{name}_{tag}_depth.png"),
                         ("depth preview", folder / f"{name}_{tag}_depth_color.png")]
        if orbit:
            plan += [("orbit video", folder / f"{name}_orbit.mp4"), ("orbit gif", folder / f"{name}_orbit.gif")]
        if mesh is not None:
            plan.append(("mesh", mesh if len(sources) == 1 else mesh.with_name(f"{mesh.stem}_{name}{mesh.suffix}")))
        views_plan.append(pairs)
    if grid:
        plan.append(("contact sheet", folder / "grid.png"))
    check_free([p for _, p in plan], opts.force)

    near, far = float(G.rendering_kwargs["ray_start"]), float(G.rendering_kwargs["ray_end"])
    paths = iter(p for _, p in plan)
    sheet, summary = [], []
    with output.progress() as bar:
        task = bar.add_task("rendering", total=len(sources) * (n_views + (orbit or 0)), status="")
        for (name, ws, cam), pairs in zip(sources, views_plan, strict=True):
            planes = G.planes(ws, noise_mode="const", channels_last=bool(channels_last))  # fp32: NHWC only if asked
            if own_camera:
                cams = cam
            else:
                cams, _ = cameras_for(yaws, pitches, G)
            views = render_views(G, ws, cams, batch, planes=planes, on_batch=lambda n: bar.advance(task, n),
                                 amp=amp, compile=compile_, channels_last=channels_last)
            entry = {"source": name, "views": []}
            for k, (tag, _) in enumerate(pairs):
                img = media.to_uint8(views.images[k])
                png = next(paths)
                media.write_png(png, img)
                sheet.append(img)
                view = {"tag": tag, "image": str(png)}
                if depth:
                    d = views.depth[k, 0].numpy()
                    dpng, cpng = next(paths), next(paths)
                    media.write_png(dpng, media.depth_to_uint16(d, near, far),
                                    text={"depth_near": f"{near:g}", "depth_far": f"{far:g}",
                                          "depth_units": "scene units along the ray; 0 = near, 65535 = far"})
                    media.write_png(cpng, media.colorize_depth(d))
                    view.update(depth=str(dpng), depth_preview=str(cpng),
                                depth_min=float(d.min()), depth_max=float(d.max()))
                entry["views"].append(view)
            if orbit:
                angles = orbit_angles(orbit)
                ocams = camera_rig(G).lookat([a for a, _ in angles], [b for _, b in angles])
                frames = render_views(G, ws, ocams, batch, planes=planes, on_batch=lambda n: bar.advance(task, n),
                                      amp=amp, compile=compile_, channels_last=channels_last)
                frames_u8 = [media.to_uint8(f) for f in frames.images]
                mp4, gif = next(paths), next(paths)
                media.write_mp4(mp4, frames_u8, fps)
                media.write_gif(gif, frames_u8, fps)
                entry.update(orbit_mp4=str(mp4), orbit_gif=str(gif), orbit_frames=orbit)
            if mesh is not None:
                from my3dgen_cli.use.mesh import extract_mesh

                mesh_path = next(paths)
                try:
                    shape = extract_mesh(G, ws, mesh_res, mesh_level)
                except ValueError as err:
                    raise UserInputError(f"{name}: {err} (--mesh-level)") from None
                media.write_mesh(mesh_path, shape, binary=not ascii_ply, comment=f"my3dgen {name}")
                entry.update(mesh=str(mesh_path), vertices=len(shape.vertices), faces=len(shape.faces))
            summary.append(entry)
    if grid:
        media.write_png(next(paths), media.grid(sheet, columns=1 if own_camera else len(yaws)))
    output.result({"base": ref.name, "identity": opts.identity,
                   "outputs": [{"kind": k, "path": str(p)} for k, p in plan], "sources": summary},
                  human=written(plan))
