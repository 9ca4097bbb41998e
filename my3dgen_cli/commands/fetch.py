"""`my3dgen fetch`: put registry artifacts into the verified local cache (or list them)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer

from my3dgen_cli.cli import command, output_for
from my3dgen_cli.commands.options import JsonOpt, OfflineOpt, QuietOpt
from my3dgen_cli.errors import UserInputError
from my3dgen_cli.output import Output
from my3dgen_cli.zoo.visible import human_size

RegistryOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--registry",
        help="Extra registry TOML file or URL (a lab mirror); repeatable. Also read from MY3DGEN_REGISTRY.",
    ),
]


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain aligned columns (never wrapped, so scripts can `cut` them)."""
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=False)]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in [headers, *rows]
    ]
    return "\n".join(lines)


def _list(output: Output, registry: list[str]) -> None:
    from my3dgen_cli import zoo

    rows = []
    for entry in zoo.list_entries(registry):
        state = (
            "converted"
            if zoo.converted(entry.name, entry)
            else "yes"
            if zoo.cached(entry.name, entry)
            else "no"
        )
        rows.append(
            {
                "name": entry.name,
                "kind": entry.kind,
                "size": entry.size,
                "cached": state,
                "license": entry.license,
                "sha256": entry.sha256,
                "url": entry.url,
                "description": entry.description,
            }
        )
    if output.mode == "json":
        output.result({"artifacts": rows})
        return
    table = [(r["name"], r["kind"], human_size(r["size"]), r["cached"], r["license"]) for r in rows]
    output.result(
        {"artifacts": rows}, human=format_table(("name", "kind", "size", "cached", "license"), table)
    )


@command("fetch", help="Download registry artifacts (weights) into the verified local cache.")
def fetch(
    names: Annotated[
        list[str] | None, typer.Argument(help="Artifact names (see --list).", show_default=False)
    ] = None,
    list_: Annotated[
        bool, typer.Option("--list", help="List the registry: name, kind, size, cached, license.")
    ] = False,
    from_: Annotated[
        Path | None,
        typer.Option("--from", help="Import a file downloaded by hand (verified) instead of downloading."),
    ] = None,
    local: Annotated[
        bool,
        typer.Option(
            "--local",
            help="With --from FILE.pkl: keep it as a local base generator NAME (any EG3D config, e.g. your own "
            "training snapshot), not as a registry artifact; then use --base NAME.",
        ),
    ] = False,
    offline: OfflineOpt = False,
    keep_pkl: Annotated[
        bool,
        typer.Option(
            "--keep-pkl/--drop-pkl", help="Keep a base generator's downloaded .pkl or .safetensors after conversion."
        ),
    ] = True,
    registry: RegistryOpt = None,
    json_mode: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    from my3dgen_cli import zoo

    output = output_for(json_mode, quiet)
    names, registry = names or [], registry or []
    if list_:
        if names or from_:
            raise UserInputError("--list takes no NAME and no --from; run `my3dgen fetch --list` alone")
        _list(output, registry)
        return
    if not names:
        raise UserInputError("give at least one artifact NAME, or --list to see them")
    if from_ is not None and len(names) != 1:
        raise UserInputError(f"--from imports one file: got {len(names)} names, expected exactly 1")
    if local:
        if from_ is None:
            raise UserInputError("--local keeps a file you have as a local base: give it with --from FILE.pkl")
        from my3dgen_cli.zoo.local_bases import check_local_base

        check_local_base(names[0], from_, registry=registry)  # a refusal is its error line alone
        output.info(f"{names[0]}: converting {from_.name} to a local base")
        base = zoo.import_local_base(names[0], from_, registry=registry)
        row = {"name": names[0], "kind": "base-generator", "local": True, "converted": str(base), "path": None}
        output.result({"artifacts": [row]}, human=f"{names[0]}\t{base}")
        return
    results = [zoo.fetch(name, from_, offline=offline or None, keep_pkl=keep_pkl, registry=registry,
                         display=zoo.Display(output)) for name in names]
    human = "\n".join(f"{r['name']}\t{r.get('converted') or r['path']}" for r in results)
    output.result({"artifacts": results}, human=human)
