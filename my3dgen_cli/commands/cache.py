"""`my3dgen cache ls | verify | rm`: inspect and tidy the local artifact cache."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from my3dgen_cli.cli import app, one_line_errors, output_for
from my3dgen_cli.commands.fetch import format_table, human_size
from my3dgen_cli.errors import ChecksumError

cache_app = typer.Typer(help="Inspect the local artifact cache (ls, verify, rm).", no_args_is_help=True)
app.add_typer(cache_app, name="cache")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document for scripts.")]


@cache_app.command("ls", help="List cached artifacts.")
@one_line_errors
def ls(json_mode: JsonOpt = False) -> None:
    from my3dgen_cli import paths
    from my3dgen_cli.zoo import cache as zoo

    output = output_for(json_mode)
    rows = zoo.cache_list()
    if output.mode == "json":
        output.result({"cache_dir": str(paths.cache_dir()), "cached": rows})
        return
    if not rows:
        output.info(
            f"the cache ({paths.cache_dir()}) is empty; `my3dgen fetch --list` shows what can be fetched"
        )
        return
    table = []
    for r in rows:
        fetched = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["fetched_at"])) if r["fetched_at"] else "?"
        table.append(
            (
                r["name"],
                r["kind"] or "?",
                human_size(r["size"]),
                r["sha256"][:12],
                "yes" if r["converted"] else "-",
                fetched,
            )
        )
    headers = ("name", "kind", "size", "sha256", "converted", "fetched")
    output.result({"cached": rows}, human=format_table(headers, table))


@cache_app.command("verify", help="Rehash cached artifacts (all, or the NAMEs given).")
@one_line_errors
def verify(
    names: Annotated[
        list[str] | None, typer.Argument(help="Names to check (default: all).", show_default=False)
    ] = None,
    json_mode: JsonOpt = False,
) -> None:
    from my3dgen_cli.zoo import cache as zoo

    output = output_for(json_mode)
    results = zoo.verify(names or [])
    output.result(
        {"results": results},
        human="\n".join(f"{r['name']}\t{r['status']}\t{r['detail']}" for r in results) or "nothing cached",
    )
    bad = [r["name"] for r in results if r["status"] != "ok"]
    if bad:
        raise ChecksumError(
            f"{len(bad)} of {len(results)} cached artifacts failed verification ({', '.join(bad)}); "
            f"`my3dgen fetch {bad[0]}` fetches it again (or remove it: `my3dgen cache rm {bad[0]}`)"
        )


@cache_app.command("rm", help="Remove artifacts from the cache.")
@one_line_errors
def rm(
    names: Annotated[list[str], typer.Argument(help="Names to remove.", show_default=False)],
    forget: Annotated[
        bool,
        typer.Option("--forget", help="Also forget a sha256 recorded on first fetch (accept another file)."),
    ] = False,
    json_mode: JsonOpt = False,
) -> None:
    from my3dgen_cli.zoo import cache as zoo

    output = output_for(json_mode)
    results = [zoo.remove(name, forget=forget) for name in names]
    output.result({"removed": results}, human="\n".join(f"removed {r['name']}" for r in results))
