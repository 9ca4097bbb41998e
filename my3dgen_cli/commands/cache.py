"""`my3dgen cache ls | verify | rm | prune`: see and tidy what my3dgen keeps on disk."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from my3dgen_cli.cli import app, one_line_errors, output_for
from my3dgen_cli.commands.fetch import format_table
from my3dgen_cli.commands.options import JsonOpt
from my3dgen_cli.errors import ChecksumError
from my3dgen_cli.zoo.visible import human_size

cache_app = typer.Typer(help="See and tidy the local cache and identities (ls, verify, rm, prune).",
                        no_args_is_help=True)
app.add_typer(cache_app, name="cache")



@cache_app.command("ls", help="List what my3dgen keeps on disk: blobs, converted and local bases (the demo's too), "
                              "partial downloads and identities, with size, last use and the total.")
@one_line_errors
def ls(json_mode: JsonOpt = False) -> None:
    from my3dgen_cli import paths, zoo
    from my3dgen_cli.identity_store import identity_rows

    output = output_for(json_mode)
    rows = zoo.inventory() + identity_rows()
    total = sum(r["size"] for r in rows)
    doc = {"cache_dir": str(paths.cache_dir()), "identities_dir": str(paths.identities_dir()), "items": rows,
           "total_size": total, "cached": zoo.cache_list()}
    if not rows:
        output.result(doc, f"nothing stored yet ({paths.cache_dir()}); `my3dgen fetch --list` shows what can "
                           "be fetched")
        return
    table = [(r["kind"], r["name"], human_size(r["size"]), _when(r["last_used"]), r["path"]) for r in rows]
    table.append(("total", f"{len(rows)} items", human_size(total), "", ""))
    output.result(doc, human=format_table(("kind", "name", "size", "last used", "path"), table))


def _when(stamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp)) if stamp else "?"


@cache_app.command("verify", help="Rehash cached artifacts and converted bases, and reread local bases (all, or "
                                  "the NAMEs given).")
@one_line_errors
def verify(
    names: Annotated[
        list[str] | None, typer.Argument(help="Names to check (default: all).", show_default=False)
    ] = None,
    json_mode: JsonOpt = False,
) -> None:
    from my3dgen_cli import zoo

    output = output_for(json_mode)
    names = names or []
    local = [r for r in zoo.verify_local_bases() if not names or r["name"] in names]
    zoo_names = [n for n in names if n not in {r["name"] for r in local}]
    results = (zoo.verify(zoo_names) if zoo_names or not names else []) + local
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


@cache_app.command("rm", help="Remove cached artifacts and local bases by name (identities with --identity). A "
                              "base that identities were trained on is kept unless --force.")
@one_line_errors
def rm(
    names: Annotated[list[str], typer.Argument(help="Names to remove (`my3dgen cache ls`).", show_default=False)],
    forget: Annotated[
        bool,
        typer.Option("--forget", help="Also forget a sha256 recorded on first fetch (accept another file)."),
    ] = False,
    identity: Annotated[
        bool, typer.Option("--identity", help="The NAMEs are identities: delete them (as `my3dgen identities rm`).")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Remove a base even when identities were trained on it (they stay, and "
                                           "work again once the base is back).")
    ] = False,
    json_mode: JsonOpt = False,
) -> None:
    output = output_for(json_mode)
    if identity:
        from my3dgen_cli.identity import identity_paths
        from my3dgen_cli.identity_store import remove_identity

        for name in names:
            identity_paths(name)  # every name is checked before anything is removed
        results = [remove_identity(name) for name in names]
    else:
        back = {name: _back_again(name) for name in names}  # before a local base is gone
        users = _base_users(names, force, back)  # every base is checked before anything is removed
        results = []
        for name in names:
            result = {**_remove_cached(name, forget), "identities": users[name].finished,
                      "unfinished_identities": users[name].unfinished}
            if users[name]:
                output.warn(f"removed base {name}, which {users[name].were()} trained on; the identities stay and "
                            f"work again {back[name]}")
            results.append(result)
    output.result({"removed": results}, human="\n".join(f"removed {r['name']}" for r in results))


def _base_users(names: list[str], force: bool, back: dict[str, str]) -> dict[str, Any]:
    """identity_store.BaseUsers of each name; without --force, the first base in use is refused in one line."""
    from my3dgen_cli.errors import UserInputError
    from my3dgen_cli.identity_store import identities_on_base

    users = {name: identities_on_base(name) for name in names}
    for name, used in users.items():
        if used and not force:
            raise UserInputError(f"{used.were()} trained on base {name}; nothing was removed; --force removes it "
                                 f"anyway (the identities stay and work again {back[name]})")
    return users


def _back_again(name: str) -> str:
    """How a removed base comes back: a zoo base is fetched again; a local base is imported again from its file."""
    from my3dgen_cli import zoo

    if zoo.is_local_base(name):
        return f"after `my3dgen fetch {name} --from FILE.pkl --local`"
    return f"after `my3dgen fetch {name}`"


def _remove_cached(name: str, forget: bool) -> dict[str, Any]:
    """A zoo name (blob, conversion, partial download) or a local base; an identity only with --identity."""
    from my3dgen_cli import zoo
    from my3dgen_cli.errors import ArtifactError

    if zoo.is_local_base(name):
        return zoo.remove_local_base(name)
    try:
        return zoo.remove(name, forget=forget)
    except ArtifactError:
        from my3dgen_cli import paths

        if "/" not in name and (paths.identities_dir() / name).is_dir():
            raise ArtifactError(f"{name} is an identity, not a cached artifact; remove it with "
                                f"`my3dgen identities rm {name}` (or `my3dgen cache rm {name} --identity`)") from None
        raise


@cache_app.command("prune", help="Remove partial downloads, blobs and conversions no name refers to, and leftover "
                                 "identity build folders (.NAME.new-*, .NAME.old-*) of processes that are gone.")
@one_line_errors
def prune(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would be removed.")] = False,
    json_mode: JsonOpt = False,
) -> None:
    from my3dgen_cli import zoo
    from my3dgen_cli.identity_store import leftover_builds

    output = output_for(json_mode)
    rows = zoo.prune_candidates() + leftover_builds()
    if not dry_run:
        for row in rows:
            zoo.remove_path(row["path"])
    freed = sum(r["size"] for r in rows)
    verb = "would remove" if dry_run else "removed"
    lines = [f"{verb} {r['kind']} {r['name']} ({human_size(r['size'])}): {r['reason']}" for r in rows]
    items = f"{len(rows)} item{'s' * (len(rows) != 1)}"
    lines.append(f"{verb} {items}, {human_size(freed)}" if rows else "nothing to prune")
    output.result({"removed": rows, "freed": freed, "dry_run": dry_run}, human="\n".join(lines))
