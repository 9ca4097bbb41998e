"""Many identities from one batch file, shared among torchrun ranks; rerun to finish what failed.

    name,photos,labels
    ana,photos/ana,
    bo,photos/bo/1.jpg;photos/bo/2.jpg,
    cy,crops/cy,crops/cy/dataset.json

`photos` is a folder or files separated by ';', `labels` an optional EG3D dataset.json; relative
paths are read from the batch file's folder. Row i goes to rank i mod world size (static, so
no coordination and no lock is needed). Each identity is trained by one rank alone, with the
seed `distributed.identity_seed(seed, name)`, so its adapter does not depend on the rank or the
number of ranks. On a rerun an identity with an adapter is skipped, one with a checkpoint (or
anchors projected before the failure) resumes from it, and any other starts over.
"""

from __future__ import annotations

import copy
import csv
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from my3dgen_cli.errors import UserInputError, reason
from my3dgen_cli.output import Output
from my3dgen_cli.personalize.distributed import SINGLE, Dist, identity_seed


@dataclass(frozen=True)
class Person:
    name: str
    photos: list[Path]
    labels: Path | None


def read_batch_file(path: str | Path) -> list[Person]:
    """Rows of a batch CSV (header name, photos[, labels]); names checked and unique."""
    from my3dgen_cli.identity import check_name

    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: Excel's "CSV UTF-8" opens with a BOM
            rows = list(csv.DictReader(f))
    except OSError as err:
        raise UserInputError(f"--batch-file: cannot read {path} ({err.strerror or err})") from None
    except (UnicodeDecodeError, csv.Error) as err:
        raise UserInputError(f"--batch-file {path}: not a UTF-8 CSV file ({reason(err)}); save it as CSV UTF-8"
                             ) from None
    if not rows or not {"name", "photos"} <= set(rows[0]):
        raise UserInputError(f"--batch-file {path}: got columns {sorted(rows[0]) if rows else []}, "
                             "expected a header with name, photos[, labels]")
    people, seen = [], set()
    for line, row in enumerate(rows, start=2):
        name = (row.get("name") or "").strip()
        check_name(name)
        if name in seen:
            raise UserInputError(f"--batch-file {path} line {line}: name {name!r} appears twice")
        seen.add(name)
        photos = [path.parent / p.strip() for p in (row.get("photos") or "").split(";") if p.strip()]
        if not photos:
            raise UserInputError(f"--batch-file {path} line {line}: got no photos for {name!r}, expected a folder "
                                 "or files separated by ';'")
        labels = (row.get("labels") or "").strip()
        people.append(Person(name, photos, path.parent / labels if labels else None))
    return people


def state_of(name: str) -> str:
    """"done" (has its adapter), "partial" (an unfinished run to resume) or "new"."""
    from my3dgen_cli.identity import identity_paths
    from my3dgen_cli.personalize.pipeline import can_resume

    if identity_paths(name).adapter.is_file():
        return "done"
    return "partial" if can_resume(name) else "new"


def personalize_people(
    people: list[Person],
    config: Any,
    base: str = "eg3d-ffhq512-128",
    *,
    world: Dist = SINGLE,
    generator: nn.Module | None = None,
    device: Any = None,
    nets: Any = None,
    offline: bool | None = None,
    output: Output | None = None,
    reproject: bool = False,
) -> list[dict[str, Any]]:
    """Personalize this rank's share of `people` (row i on rank i mod world.world).

    config: a PersonalizeConfig; each identity trains with seed identity_seed(config.seed, name).
    generator: a base to copy for each identity (instead of opening `base`). Returns one dict per
    row of this rank: name, state before ("done" -> skipped, "partial" -> resumed, "new"), and the
    IdentityResult as a dict when trained. reproject: project the photos of My3DGen dataset folders too.
    """
    from my3dgen_cli.personalize.pipeline import personalize

    out = output or Output("quiet")
    done: list[dict[str, Any]] = []
    for i, person in enumerate(people):
        if i % world.world != world.rank:
            continue
        before = state_of(person.name)
        row: dict[str, Any] = {"name": person.name, "rank": world.rank, "state": before}
        if before == "done":
            out.info(f"{person.name}: already personalized, skipped")
            done.append(row)
            continue
        own = replace(config, seed=identity_seed(config.seed, person.name))
        G = copy.deepcopy(generator) if generator is not None else None
        result = personalize(list(person.photos), person.name, own, base, generator=G, device=device, nets=nets,
                             resume=before == "partial", labels=person.labels, reproject=reproject,
                             offline=offline, output=out)
        row["result"] = result.to_dict()
        done.append(row)
    return done
