"""`my3dgen demo` and `my3dgen eval`: thin wrappers over my3dgen_cli.demo.run and my3dgen_cli.use.evaluate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from my3dgen_cli.cli import command, output_for
from my3dgen_cli.commands.options import MAX_STEPS, DeviceOpt, JsonOpt, OfflineOpt, Space, check_range


@command("demo", help="Run the whole pipeline offline on a tiny synthetic base (or --base/--photos) and write "
                      "an HTML report.")
def demo_cmd(
    out: Annotated[Path | None, typer.Option("--output", "--out", "-o", show_default=False,
                                             help="Report folder (default: <data>/demo, replaced).")] = None,
    fast: Annotated[bool, typer.Option("--fast", help="Fewer steps everywhere (the test suite's run).")] = False,
    rebuild_base: Annotated[bool, typer.Option("--rebuild-base", help="Fit the synthetic base and its person from "
                                               "the recipe (minutes) instead of using the shipped ones.")] = False,
    base: Annotated[str | None, typer.Option("--base", help="A real base (zoo name, local base or file); needs "
                                             "--photos.", show_default=False)] = None,
    photos: Annotated[Path | None, typer.Option("--photos", help="Photo folder for --base (last photo held out).",
                                                show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an identity named `demo` that the demo did not "
                                        "make.")] = False,
    device: DeviceOpt = "cpu",
    json_out: JsonOpt = False,
) -> None:
    from my3dgen_cli.demo.run import run_demo
    from my3dgen_cli.devices import keep_freed_memory, pick_device

    o = output_for(json_out)
    chosen = pick_device(device)
    if chosen.type == "cpu" and base is None:  # the tiny synthetic base: reuse freed memory (page faults)
        keep_freed_memory()
    result = run_demo(out, fast=fast, base=base, photos=photos, device=str(chosen), output=o,
                      rebuild_base=rebuild_base, force=force)
    mean = result.metrics["mean"]
    human = (f"demo finished in {result.seconds:.0f} s (base {result.base}, {result.base_origin})\n"
             f"held-out PSNR: base {mean['base']['psnr']:.2f} dB, personalized {mean['personalized']['psnr']:.2f} dB\n"
             f"report: {result.report}")
    o.result(result.to_dict(), human)


@command("eval", help="Reconstruction metrics of held-out photos: base vs an identity's personalized prior.")
def eval_cmd(
    photos: Annotated[list[Path], typer.Argument(help="Held-out photo files/folders (a folder with an EG3D "
                                                      "dataset.json is read as aligned crops).")],
    identity: Annotated[str, typer.Option("--identity", help="The identity to evaluate.")],
    steps: Annotated[int, typer.Option("--steps", help="Inversion steps per photo and model.")] = 100,
    space: Annotated[Space, typer.Option("--space", help="Inversion latent space: w or w+.")] = Space.w,
    labels: Annotated[Path | None, typer.Option("--labels", help="EG3D dataset.json with the photos' cameras.",
                                                show_default=False)] = None,
    device: DeviceOpt = "auto",
    offline: OfflineOpt = False,
    json_out: JsonOpt = False,
) -> None:
    from my3dgen_cli.devices import pick_device
    from my3dgen_cli.identity import require_identity
    from my3dgen_cli.losses.arcface import identity_network
    from my3dgen_cli.losses.perceptual import offline_fallback, perceptual_loss
    from my3dgen_cli.personalize.photos import read_photos
    from my3dgen_cli.use.evaluate import evaluate

    o = output_for(json_out)
    check_range("--steps", steps, 0, MAX_STEPS)
    require_identity(identity)  # the identity and the device before the photos and any note on the losses
    dev = pick_device(device)
    given = read_photos(list(photos), labels=labels)
    lpips = perceptual_loss("alex", offline=offline or None, required=False, output=o)
    arcface = identity_network(offline=offline or None, output=o)
    if lpips is None:
        o.warn(offline_fallback(["lpips-alexnet"], "no LPIPS column, pixel-only inversion"))
    if arcface is None:
        o.warn(offline_fallback(["arcface-ir-se50"], "no identity column"))
    result = evaluate(identity, given.images, given.cameras, given.names, steps=steps, space=space.value,
                      device=dev, lpips=lpips, arcface=arcface)
    o.result(result.to_dict(), result.table())
