"""`my3dgen personalize` and `my3dgen identities`: thin wrappers over my3dgen_cli.personalize."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from my3dgen_cli.cli import command, output_for

SYM_CHOICES = ("id", "lpips")


@command("personalize", help="Build a personal 3D face prior (LoRA adapter) from ~10 photos of one person.")
def personalize_cmd(
    photos: Annotated[list[Path], typer.Argument(help="Photo files and/or folders (a folder with an EG3D "
                                                      "dataset.json is read as aligned crops).")],
    name: Annotated[str, typer.Option("--name", "-n", help="Identity name (folder under identities/).")],
    base: Annotated[str, typer.Option(help="Base generator: zoo name, local base or file.")] = "eg3d-ffhq512-128",
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = 1,
    alpha: Annotated[float | None, typer.Option(help="LoRA alpha (default: rank, scale 1).")] = None,
    steps: Annotated[int, typer.Option(help="Adapter training steps.")] = 1000,
    batch: Annotated[int, typer.Option(help="Photos per training step.")] = 2,
    lr: Annotated[float, typer.Option(help="Adam learning rate (betas 0, 0.99).")] = 0.0025,
    sym: Annotated[bool, typer.Option("--sym/--no-sym", help="Face-symmetry regularization.")] = True,
    sym_loss: Annotated[str, typer.Option(help="Symmetry distance: id (ArcFace) or lpips.")] = "id",
    sym_every: Annotated[int, typer.Option(help="Symmetry term every k steps.")] = 4,
    anchor_steps: Annotated[int, typer.Option(help="Projection steps per photo (anchors).")] = 300,
    anchor_space: Annotated[str, typer.Option(help="Anchor latent space: w or w+.")] = "w",
    mirror: Annotated[bool, typer.Option("--mirror", help="Also train on mirrored photos.")] = False,
    include_mapping: Annotated[bool, typer.Option("--include-mapping", help="Adapt the mapping network.")] = False,
    include_decoder: Annotated[bool, typer.Option("--include-decoder", help="Adapt the tri-plane decoder.")] = False,
    labels: Annotated[Path | None, typer.Option(help="EG3D dataset.json with the photos' cameras.")] = None,
    aligned: Annotated[bool | None, typer.Option("--aligned/--detect", help="Photos are EG3D crops "
                                                 "(default: when a dataset.json is found).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    amp: Annotated[bool, typer.Option("--amp", help="Mixed precision (CUDA only).")] = False,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint every N steps (0 = only on Ctrl-C).")] = 100,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing identity.")] = False,
    offline: Annotated[bool, typer.Option("--offline", help="Use only cached artifacts.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Result only, no progress.")] = False,
) -> None:
    from my3dgen_cli.errors import UserInputError

    if resume and force:
        raise UserInputError("--resume continues an identity and --force replaces it: pass one of them")
    if sym_loss not in SYM_CHOICES:
        raise UserInputError(f"--sym-loss: got {sym_loss!r}, expected one of {', '.join(SYM_CHOICES)}")
    from my3dgen_cli import paths
    from my3dgen_cli.devices import pick_device
    from my3dgen_cli.identity import check_name
    from my3dgen_cli.personalize import PersonalizeConfig, personalize, read_photos

    out = output_for(json_out, quiet)
    check_name(name)
    config = PersonalizeConfig(rank=rank, alpha=alpha, steps=steps, batch=batch, lr=lr, sym=sym, sym_loss=sym_loss,
                               sym_every=sym_every, anchor_steps=anchor_steps, anchor_space=anchor_space,
                               mirror=mirror, include_mapping=include_mapping, include_decoder=include_decoder,
                               seed=seed, checkpoint_every=checkpoint_every, amp=amp)
    given = read_photos(list(photos), labels=labels, aligned=aligned)  # bad photos fail before the base loads
    result = personalize(given, name, config, base=base, device=pick_device(device), resume=resume, force=force,
                         offline=offline or paths.offline(), output=out)
    human = (f"identity {result.name}: {len(result.photos)} photos, {result.steps} steps, "
             f"final loss {result.final_loss:.4f}\n"
             f"adapter: {result.parameters:,} parameters ({result.ratio:.0f}x fewer than full fine-tuning's "
             f"{result.full_parameters:,}), {result.adapter_bytes / 1024:.0f} KiB\n"
             f"folder: {result.folder}")
    out.result(result.to_dict(), human)


@command("identities", help="List personalized identities.")
def identities_cmd(
    json_out: Annotated[bool, typer.Option("--json", help="Print the list as JSON.")] = False,
) -> None:
    from my3dgen_cli.identity import list_identities
    from my3dgen_cli.personalize import describe_identity

    out = output_for(json_out)
    rows = [describe_identity(n) for n in list_identities()]
    if not rows:
        out.result({"identities": []}, "no identities yet; make one with `my3dgen personalize PHOTOS --name NAME`")
        return
    lines = [f"{'name':<20} {'base':<22} {'params':>9} {'size':>9} {'photos':>6}  created"]
    for r in rows:
        lines.append(f"{r['name']:<20} {r['base']:<22} {r['parameters']:>9,} {r['bytes'] / 1024:>7.0f}KB "
                     f"{r['photos']:>6}  {r['created']}")
    out.result({"identities": rows}, "\n".join(lines))
