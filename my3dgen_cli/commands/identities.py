"""`my3dgen identities [list | rm | export | import]`: the identities a user keeps, and sharing them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from my3dgen_cli.cli import app, one_line_errors, output_for
from my3dgen_cli.commands.options import JsonOpt, OfflineOpt

identities_app = typer.Typer(help="List personalized identities (no subcommand); remove, export or import one "
                                  "(an identity archive .zip, or a My3DGen snapshot .pkl).",
                             invoke_without_command=True)
app.add_typer(identities_app, name="identities")

SNAPSHOT_SUFFIXES = (".pkl", ".pkl.xz")


@identities_app.callback(invoke_without_command=True)
@one_line_errors
def identities_cmd(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    if ctx.invoked_subcommand is None:
        _list_identities(json_out)


@identities_app.command("list", help="List personalized identities (what `my3dgen identities` prints); broken "
                                     "folders are listed apart with the reason.")
@one_line_errors
def identities_list(json_out: JsonOpt = False) -> None:
    _list_identities(json_out)


def _list_identities(json_out: bool) -> None:
    from my3dgen_cli.identity_store import survey_identities

    out = output_for(json_out)
    survey = survey_identities()
    doc = {"identities": survey.good, "broken": survey.broken, "unfinished": survey.unfinished}
    if not survey.good and not survey.broken and not survey.unfinished:
        out.result(doc, "no identities yet; make one with `my3dgen personalize PHOTOS --name NAME`")
        return
    lines = [f"{'name':<20} {'base':<22} {'params':>9} {'size':>9} {'photos':>6}  created"] if survey.good else []
    for r in survey.good:
        lines.append(f"{r['name']:<20} {r['base']:<22} {r['parameters']:>9,} {r['bytes'] / 1024:>7.0f}KB "
                     f"{r['photos']:>6}  {r['created']}")
    for b in survey.broken:
        lines.append(f"{b['name']:<20} BROKEN: {b['reason']} (`my3dgen identities rm {b['name']}` removes it)")
    for u in survey.unfinished:
        lines.append(f"{u['name']:<20} UNFINISHED: {u['reason']}")
    out.result(doc, "\n".join(lines))


@identities_app.command("rm", help="Delete identities (their whole folder, usable or broken).")
@one_line_errors
def identities_rm(
    names: Annotated[list[str], typer.Argument(help="Identity names.", show_default=False)],
    json_out: JsonOpt = False,
) -> None:
    from my3dgen_cli.identity import identity_paths
    from my3dgen_cli.identity_store import remove_identity

    for name in names:
        identity_paths(name)  # every name is checked before anything is removed
    out = output_for(json_out)
    removed = [remove_identity(n) for n in names]
    out.result({"removed": removed}, "\n".join(f"removed {r['name']}: {r['removed']} ({r['bytes'] / 1024:.0f} KiB)"
                                               for r in removed))


@identities_app.command("export", help="Write an identity as a zip archive (adapter, anchors, previews, metadata) "
                                       "that `my3dgen identities import` reads on another machine.")
@one_line_errors
def identities_export(
    name: Annotated[str, typer.Argument(help="Identity name.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="The archive to write (e.g. ana.zip).")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
    json_out: JsonOpt = False,
) -> None:
    from my3dgen_cli.identity_store import export_identity

    result = export_identity(name, output, force=force)
    output_for(json_out).result(result, f"identity {name} (base {result['base']}) -> {result['output']} "
                                        f"({result['bytes'] / 1024:.0f} KiB: {', '.join(result['members'])})")


@identities_app.command("import", help="Import an identity: an archive from `my3dgen identities export` (.zip; "
                                       "checked, and refused unless its base is here with the same weights), or "
                                       "a snapshot written by the official My3DGen code (.pkl or .pkl.xz; its "
                                       "LoRA factors and trained biases, noise strengths and const become a "
                                       "regular adapter).")
@one_line_errors
def identities_import(
    source: Annotated[Path, typer.Argument(help="NAME.zip from `identities export`, or network-snapshot-NNNNNN.pkl "
                                                "(or .pkl.xz) of a My3DGen run.", show_default=False)],
    name: Annotated[str | None, typer.Option("--name", "-n", help="Identity name (folder under identities/); "
                                             "required for a snapshot, default for an archive: its own name.",
                                             show_default=False)] = None,
    base: Annotated[str | None, typer.Option(help="Snapshots only: the base it was trained on (zoo name, local base "
                                                  "or file); its frozen weights must equal the snapshot's. Default: "
                                                  "the snapshot's own frozen weights become the local base NAME-base.",
                                             show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing identity (and NAME-base).")] = False,
    offline: OfflineOpt = False,
    json_out: JsonOpt = False,
) -> None:
    from my3dgen_cli.errors import UserInputError

    if source.name.endswith(SNAPSHOT_SUFFIXES):
        if name is None:
            raise UserInputError(f"importing the snapshot {source.name} needs --name NAME")
        _import_snapshot(source, name, base, force, offline, json_out)
        return
    if source.suffix != ".zip":
        raise UserInputError(f"identities import: got {str(source)!r}, expected an identity archive (.zip) or a "
                             "My3DGen snapshot (.pkl, .pkl.xz)")
    if base is not None:
        raise UserInputError("--base is for snapshots; an archive names its base (checked against the one here)")
    if not source.is_file():
        raise UserInputError(f"identity archive not found: {source}")
    from my3dgen_cli.identity_store import import_identity_archive

    result = import_identity_archive(source, name, force=force)
    output_for(json_out).result(result, f"identity {result['name']}: imported from {source.name} on base "
                                        f"{result['base']} ({result['anchors']} anchors)\nfolder: {result['path']}")


def _import_snapshot(snapshot: Path, name: str, base: str | None, force: bool, offline: bool, json_out: bool) -> None:
    from my3dgen_cli import paths
    from my3dgen_cli.weights.my3dgen_snapshot import check_import_target, import_snapshot

    out = output_for(json_out)
    check_import_target(snapshot, name, base, force)  # a name or file error before the progress bar
    with out.progress() as bar:
        bar.add_task(f"importing {snapshot.name}", total=None, status="")
        result = import_snapshot(snapshot, name, base=base, force=force, offline=offline or paths.offline())
    human = (f"identity {result.name}: imported from {snapshot.name} on base {result.base}"
             f"{' (created from the snapshot)' if result.base_created else ''}\n"
             f"adapter: rank {result.rank}, alpha {result.alpha:g}: {result.lora_parameters:,} LoRA + "
             f"{result.extra_parameters:,} trained extras = {result.lora_parameters + result.extra_parameters:,} "
             f"parameters, {result.adapter_bytes / 1024:.0f} KiB\n"
             + "".join(f"note: {n}\n" for n in result.notes)
             + f"folder: {result.folder}")
    out.result(result.to_dict(), human)
