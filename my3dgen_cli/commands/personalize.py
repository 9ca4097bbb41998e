"""`my3dgen personalize`: a thin wrapper over my3dgen_cli.personalize.pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from my3dgen_cli.cli import command, output_for
from my3dgen_cli.commands.options import Amp, Budget, JsonOpt, OfflineOpt, QuietOpt, Space, SymLoss

TRAIN_EXTRAS_HELP = ("Also train what My3DGen trains beside the LoRA factors: b4.const, biases and noise strengths "
                     "(full size: 219,174 LoRA + 24,791 = 243,965 values; without: 219,174).")


@command("personalize", help="Build a personal 3D face prior (LoRA adapter) from ~10 photos of one person. "
                              "Runs data-parallel under torchrun; --batch-file shares many people among ranks.")
def personalize_cmd(
    photos: Annotated[list[Path] | None, typer.Argument(help="Photo files and/or folders (a folder with an EG3D "
                                                             "dataset.json is read as aligned crops; one with "
                                                             "image_N_latent.npy too brings its anchors).")] = None,
    name: Annotated[str | None, typer.Option("--name", "-n", help="Identity name (folder under identities/).")
                    ] = None,
    batch_file: Annotated[Path | None, typer.Option("--batch-file", help="CSV of people (name, photos[, labels]) "
                                                    "instead of PHOTOS --name; rerun to finish failed ones.")] = None,
    base: Annotated[str, typer.Option(help="Base generator: zoo name, local base or file.")] = "eg3d-ffhq512-128",
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = 1,
    alpha: Annotated[float | None, typer.Option(help="LoRA alpha (default: rank, scale 1).")] = None,
    budget: Annotated[Budget, typer.Option(help="Steps preset: quick, standard or paper (training / anchor steps "
                                                "300/100, 600/200, 1000/300); --steps / --anchor-steps override.")
                      ] = Budget.paper,
    steps: Annotated[int | None, typer.Option(help="Adapter training steps (default: from --budget).")] = None,
    batch: Annotated[int, typer.Option(help="Photos per training step (over all ranks).")] = 2,
    accum: Annotated[int, typer.Option(help="Micro-batches per step on each rank (same batch, less memory).")] = 1,
    lr: Annotated[float, typer.Option(help="Adam learning rate (betas 0, 0.99).")] = 0.0025,
    sym: Annotated[bool, typer.Option("--sym/--no-sym", help="Face-symmetry regularization.")] = True,
    sym_loss: Annotated[SymLoss, typer.Option(help="Symmetry distance: id (ArcFace) or lpips.")] = SymLoss.id,
    sym_every: Annotated[int, typer.Option(help="Symmetry term every k steps.")] = 4,
    anchor_steps: Annotated[int | None, typer.Option(help="Projection steps per photo (default: from --budget).")
                            ] = None,
    anchor_space: Annotated[Space, typer.Option(help="Anchor latent space: w or w+.")] = Space.w,
    mirror: Annotated[bool, typer.Option("--mirror", help="Also train on mirrored photos.")] = False,
    include_mapping: Annotated[bool, typer.Option("--include-mapping", help="Adapt the mapping network.")] = False,
    include_decoder: Annotated[bool, typer.Option("--include-decoder", help="Adapt the tri-plane decoder.")] = False,
    train_extras: Annotated[bool, typer.Option("--train-extras/--no-train-extras", help=TRAIN_EXTRAS_HELP)] = True,
    labels: Annotated[Path | None, typer.Option(help="EG3D dataset.json with the photos' cameras.")] = None,
    aligned: Annotated[bool | None, typer.Option("--aligned/--detect", help="Photos are EG3D crops "
                                                 "(default: when a dataset.json is found).")] = None,
    reproject: Annotated[bool, typer.Option("--reproject", help="Project the photos even when a My3DGen dataset "
                                            "folder brings its own latents (image_N_latent.npy).")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps (under torchrun: cuda = cuda:LOCAL_RANK).")
                      ] = "auto",
    amp: Annotated[Amp, typer.Option("--amp", help="Autocast in training: off (exact fp32), bf16 (CUDA; CPUs "
                                                   "with AVX-512) or fp16 (CUDA).")] = Amp.off,
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile the generator (pays off on long runs).")
                        ] = False,
    act_checkpointing: Annotated[bool, typer.Option("--checkpoint-activations", help="Recompute activations in "
                                                    "backward: less memory, about 1/3 more time.")] = False,
    channels_last: Annotated[bool | None, typer.Option(
        "--channels-last/--no-channels-last", help="NHWC memory for the convolutions (same result up to float "
        "order; default: on with --amp on CUDA).", show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint every N steps (0 = only on Ctrl-C).")] = 100,
    estimate: Annotated[bool, typer.Option("--estimate/--no-estimate", help="Time a few steps first and print "
                                           "what the run will take.")] = True,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing identity.")] = False,
    offline: OfflineOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Long only because typer declares every option as a parameter: the body checks the options, builds
    one PersonalizeConfig and calls personalize() (or personalize_people() for --batch-file)."""
    budget, sym_loss, anchor_space, amp = budget.value, sym_loss.value, anchor_space.value, amp.value
    from my3dgen_cli.errors import UserInputError

    if resume and force:
        raise UserInputError("--resume continues an identity and --force replaces it: pass one of them")
    if batch_file is not None and (photos or name or resume or force):
        raise UserInputError("--batch-file takes the people from the file: drop PHOTOS, --name, --resume and --force "
                             "(a rerun resumes unfinished people and skips finished ones)")
    if batch_file is None and (not photos or not name):
        raise UserInputError("personalize needs PHOTOS and --name NAME (or --batch-file FILE)")
    from my3dgen_cli.commands.options import BATCH_RANGE, LR_RANGE, MAX_RANK, MAX_SEED, MAX_STEPS, check_range

    for option, value, limits in (("--rank", rank, (1, MAX_RANK)), ("--alpha", alpha, (1e-8, 1e6)),
                                  ("--steps", steps, (1, MAX_STEPS)), ("--anchor-steps", anchor_steps, (0, MAX_STEPS)),
                                  ("--batch", batch, BATCH_RANGE), ("--accum", accum, BATCH_RANGE),
                                  ("--lr", lr, LR_RANGE), ("--sym-every", sym_every, (1, MAX_STEPS)),
                                  ("--seed", seed, (0, MAX_SEED)),
                                  ("--checkpoint-every", checkpoint_every, (0, MAX_STEPS))):
        check_range(option, value, *limits)
    from my3dgen_cli import paths
    from my3dgen_cli.devices import pick_device
    from my3dgen_cli.identity import check_name
    from my3dgen_cli.output import Output
    from my3dgen_cli.personalize import distributed as D
    from my3dgen_cli.personalize.config import BUDGETS, PersonalizeConfig
    from my3dgen_cli.personalize.photos import read_photos
    from my3dgen_cli.personalize.pipeline import personalize

    world = D.from_env()
    out = output_for(json_out, quiet) if world.is_main else Output("quiet")
    dev = D.device_for(world, pick_device(device))
    from my3dgen_cli.speed import check_amp_on

    check_amp_on(dev, amp)  # refused before minutes of anchor projection
    if dev.type == "cpu":
        from my3dgen_cli.speed import use_all_cores

        use_all_cores()
    preset_steps, preset_anchor_steps = BUDGETS[budget]
    config = PersonalizeConfig(rank=rank, alpha=alpha, steps=preset_steps if steps is None else steps, batch=batch,
                               lr=lr, sym=sym,
                               sym_loss=sym_loss, sym_every=sym_every, anchor_space=anchor_space,
                               anchor_steps=preset_anchor_steps if anchor_steps is None else anchor_steps,
                               mirror=mirror, include_mapping=include_mapping, include_decoder=include_decoder,
                               train_extras=train_extras,
                               seed=seed, checkpoint_every=checkpoint_every, amp=False if amp == "off" else amp,
                               accum=accum, act_checkpointing=act_checkpointing, compile=compile_,
                               channels_last=channels_last, estimate=estimate)
    offline = offline or paths.offline()
    if batch_file is not None:
        from my3dgen_cli.personalize.people import personalize_people, read_batch_file

        people = read_batch_file(batch_file)
        rows = personalize_people(people, config, base, world=world, device=dev, offline=offline, output=out,
                                  reproject=reproject)
        lines = [f"rank {world.rank}/{world.world}: {len(rows)} of {len(people)} people"]
        lines += [f"  {r['name']}: {'skipped (done)' if r['state'] == 'done' else r['state'] + ' -> done'}"
                  for r in rows]
        out.result({"rank": world.rank, "world": world.world, "people": rows}, "\n".join(lines))
        return
    check_name(name)
    # bad photos (and a dataset.json or latents that do not match them) fail before the base loads
    given = read_photos(list(photos), labels=labels, aligned=aligned, reproject=reproject)
    with D.process_group(world, dev):
        result = personalize(given, name, config, base=base, device=dev, resume=resume, force=force,
                             offline=offline, output=out, world=world, estimate=True)
    human = (f"identity {result.name}: {len(result.photos)} photos, {result.steps} steps, "
             f"final loss {result.final_loss:.4f}\n"
             f"adapter: {result.parameters:,} parameters ({result.ratio:.0f}x fewer than full fine-tuning's "
             f"{result.full_parameters:,}), {result.adapter_bytes / 1024:.0f} KiB\n"
             f"folder: {result.folder}")
    if world.is_main:
        out.result(result.to_dict(), human)

