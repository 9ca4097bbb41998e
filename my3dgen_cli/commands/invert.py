"""`my3dgen invert`: photos -> latents of the personalized (or base) generator."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from my3dgen_cli.cli import command
from my3dgen_cli.commands.options import (
    LR_RANGE,
    MAX_RANK,
    MAX_STEPS,
    ModelOptions,
    check_free,
    check_range,
    model_options,
    written,
)
from my3dgen_cli.errors import UserInputError


def _read_labels(path: Path) -> dict[str, list[float]]:
    """EG3D dataset.json {"labels": [[file name, [25 floats]], ...]} -> {file name: label}."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))["labels"]
        table = {str(name): [float(v) for v in label] for name, label in rows}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserInputError(f"{path}: not an EG3D dataset.json ({err})") from None
    for name, label in table.items():
        if len(label) != 25:
            raise UserInputError(f"{path}: label of {name} has {len(label)} values, expected 25")
    return table


def load_crop(path: Path, size: int) -> Any:
    """An aligned square crop -> [1, 3, size, size] tensor in [-1, 1]."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise UserInputError(f"{path}: not a readable image ({err.__class__.__name__})") from None
    if im.width != im.height:
        raise UserInputError(f"{path}: got a {im.width}x{im.height} image, expected a square aligned crop "
                             "(leave out --yaw/--pitch/--labels to detect and crop the face)")
    if im.width != size:
        im = im.resize((size, size), Image.Resampling.LANCZOS)
    x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 127.5 - 1
    return x.unsqueeze(0)


def _targets(images: list[Path], size: int, yaw: float | None, pitch: float | None, labels: Path | None, rig):
    """[(stem, target [1,3,size,size], camera [1,25])] from crops + camera (--yaw/--pitch on the base's
    camera rig), or via face detection."""
    import torch
    import torch.nn.functional as F

    for p in images:
        if not p.is_file():
            raise UserInputError(f"image not found: {p}")
    if yaw is not None or pitch is not None:
        cam = rig.lookat(yaw or 0.0, pitch or 0.0)
        return [(p.stem, load_crop(p, size), cam) for p in images]
    if labels is not None:
        table = _read_labels(labels)
        out = []
        for p in images:
            label = table.get(p.name)
            if label is None:
                raise UserInputError(f"{p.name} is not listed in {labels}")
            out.append((p.stem, load_crop(p, size), torch.tensor([label])))
        return out
    try:
        from my3dgen_cli.faces.prepare import prepare_faces
    except ImportError:
        raise UserInputError("face detection is not available in this build: pass aligned crops with "
                             "--yaw/--pitch or --labels dataset.json") from None
    faces = prepare_faces(images, min_faces=len(images))
    imgs, cams = faces.images(), faces.cameras()
    if imgs.shape[-1] != size:
        imgs = F.interpolate(imgs, size=(size, size), mode="area")
    return [(f.stem, imgs[i:i + 1], cams[i:i + 1]) for i, f in enumerate(faces)]


@command("invert", help="Find the latent that renders a photo: crop + camera, then optimize (w or w+).")
@model_options(adapter=False)
def invert(
    opts: ModelOptions,
    images: Annotated[list[Path], typer.Argument(help="Photos, or aligned crops with --yaw/--pitch or --labels.")],
    steps: Annotated[int, typer.Option("--steps", help="Optimization steps.")] = 300,
    space: Annotated[str, typer.Option("--space", help="w (one vector) or w+ (one per layer).")] = "w+",
    init: Annotated[str, typer.Option("--init", help="Start from the anchors' mean or the nearest one.")] = "mean",
    hull: Annotated[bool, typer.Option("--hull", help="Stay inside the anchors' convex hull (softmax weights).")
                    ] = False,
    refine_camera: Annotated[bool, typer.Option("--refine-camera", help="Also optimize a small camera turn.")
                             ] = False,
    tune: Annotated[int, typer.Option("--tune", help="PTI: then tune the adapter N steps for this image only.")] = 0,
    tune_rank: Annotated[int, typer.Option("--tune-rank", help="Rank of a fresh adapter when tuning a bare base.")
                         ] = 1,
    lr: Annotated[float, typer.Option("--lr", help="Latent learning rate.")] = 0.02,
    yaw: Annotated[float | None, typer.Option("--yaw", help="Camera yaw (degrees) of aligned crops.")] = None,
    pitch: Annotated[float | None, typer.Option("--pitch", help="Camera pitch (degrees) of aligned crops.")] = None,
    labels: Annotated[Path | None, typer.Option("--labels", help="dataset.json with the crops' cameras.")] = None,
    use_lpips: Annotated[bool, typer.Option("--lpips/--no-lpips", help="LPIPS-VGG loss (if cached).")] = True,
) -> None:
    from my3dgen_cli import media
    from my3dgen_cli.identity import identity_anchors, save_latent
    from my3dgen_cli.use.invert import InvertConfig, invert_image
    from my3dgen_cli.use.render import check_degrees

    output = opts.output()
    check_range("--steps", steps, 0, MAX_STEPS)
    check_range("--tune", tune, 0, MAX_STEPS)
    check_range("--tune-rank", tune_rank, 1, MAX_RANK)
    check_range("--lr", lr, *LR_RANGE)
    for name, angle in (("yaw", yaw), ("pitch", pitch)):
        if angle is not None:
            check_degrees(angle, name)
    try:
        cfg = InvertConfig(steps=steps, space=space, init=init, hull=hull, refine_camera=refine_camera, lr=lr)
    except ValueError as err:
        raise UserInputError(str(err)) from None
    if labels is not None and (yaw is not None or pitch is not None):
        raise UserInputError("give either --yaw/--pitch or --labels, not both")
    stems = [p.stem for p in images]
    if len(set(stems)) != len(stems):
        raise UserInputError("two images share a file stem; outputs are named after it")
    single = opts.out is not None and opts.out.suffix == ".latent"
    if single and len(images) > 1:
        raise UserInputError(f"-o {opts.out}: one .latent file for {len(images)} images; give a folder")
    folder = (opts.out.parent if single else opts.out) if opts.out is not None else Path(".")
    plan = []
    for stem in stems:
        lat = opts.out if single else folder / f"{stem}.latent"
        row = [("latent", lat), ("preview", lat.with_suffix(".preview.png"))]
        if tune:
            row.append(("tuned adapter", lat.with_suffix(".adapter.safetensors")))
        plan.append(row)
    check_free([p for row in plan for _, p in row], opts.force)

    G, ref, dev = opts.open()
    from my3dgen_cli.eg3d.camera import camera_rig

    # bad images fail before any loss setup; --yaw/--pitch cameras sit on the base's rig
    targets = _targets(images, G.img_resolution, yaw, pitch, labels, camera_rig(G))
    anchors, _ = identity_anchors(opts.identity, dev)
    if cfg.hull and anchors is None:
        raise UserInputError("--hull needs an identity with anchors (--identity NAME)")
    net = None
    if use_lpips:
        from my3dgen_cli.losses.perceptual import offline_fallback, perceptual_loss

        net = perceptual_loss("vgg", required=False, output=output)
        if net is None:
            output.warn(offline_fallback(["lpips-vgg16"], "using pixel losses only (--no-lpips to ask for that)"))
        else:
            net = net.to(dev)
    original = None
    if tune:
        from my3dgen_cli.lora import adapter_state_dict

        original = adapter_state_dict(G)  # the identity's adapter, restored after each image

    results, rows = [], []
    with output.progress() as bar:
        for (stem, target, cam), row in zip(targets, plan, strict=True):
            target, cam = target.to(dev), cam.to(dev)
            task = bar.add_task(stem, total=steps + tune, status="")
            res = invert_image(G, target, cam, anchors, cfg, net,
                               on_step=lambda s, loss, t=task: bar.update(t, advance=1, status=f"loss {loss:.4f}"))
            entry: dict[str, Any] = {"image": stem, "psnr": round(res.psnr, 3),
                                     "lpips": None if res.lpips is None else round(res.lpips, 4),
                                     "camera_delta_deg": res.camera_delta, "init_anchor": res.init_anchor}
            preview = [media.to_uint8(target), media.to_uint8(res.image)]
            extra: dict[str, Any] = {"source": str(row[0][1].name), "psnr": res.psnr, "lpips": res.lpips,
                                     "steps": steps, "hull": hull}
            if tune:
                psnr_t, lpips_t = _tune(G, res, target, tune, tune_rank, net, cfg, original, bar, task)
                save_adapter_tuned(G, row[2][1], ref, opts.identity, stem)
                extra["adapter"] = row[2][1].name
                preview.append(media.to_uint8(_render(G, res)))
                entry.update(tuned_psnr=round(psnr_t, 3), tuned_lpips=None if lpips_t is None else round(lpips_t, 4))
                _restore(G, original)
            save_latent(row[0][1], res.ws, res.camera, base=ref.name, identity=opts.identity,
                        space=space, extra=extra)
            media.write_png(row[1][1], media.grid(preview))
            entry["files"] = {k: str(p) for k, p in row}
            results.append(entry)
            rows += row
    lines = [f"{e['image']}: PSNR {e['psnr']:.2f} dB" + (f", LPIPS {e['lpips']:.4f}" if e["lpips"] is not None else "")
             + (f"; tuned PSNR {e['tuned_psnr']:.2f} dB" if "tuned_psnr" in e else "") for e in results]
    output.result({"base": ref.name, "identity": opts.identity, "space": space, "results": results},
                  human="\n".join(lines + [written(rows)]))


def _render(G, res):
    import torch

    with torch.no_grad():
        return G.synthesis(res.ws, res.camera, noise_mode="const", sampling="deterministic")["image"]


def _tune(G, res, target, steps, rank, net, cfg, original, bar, task):
    from my3dgen_cli.lora import add_adapters
    from my3dgen_cli.use.invert import tune_adapter

    if not original:  # a bare base: a fresh adapter (B = 0, so tuning starts from the base exactly)
        add_adapters(G, rank=rank)
    psnr_t, lpips_t, _ = tune_adapter(G, res.ws, res.camera, target, steps, perceptual=net, config=cfg,
                                      on_step=lambda s, loss: bar.update(task, advance=1, status=f"tune {loss:.4f}"))
    return psnr_t, lpips_t


def save_adapter_tuned(G, path: Path, ref, identity: str | None, stem: str) -> None:
    from my3dgen_cli.lora import save_adapter

    save_adapter(G, path, base_name=ref.name, base_sha256=ref.sha256,
                 extra={"pti_for": stem, "tuned_from": identity or "base"})


def _restore(G, original) -> None:
    """Put the identity's adapter back (or drop the fresh one) before the next image."""
    import torch

    from my3dgen_cli.lora import adapter_layers, remove_adapters

    if not original:
        remove_adapters(G)
        return
    with torch.no_grad():
        for name, a in adapter_layers(G).items():
            a.lora_A.copy_(original[f"{name}.lora_A"])
            a.lora_B.copy_(original[f"{name}.lora_B"])
