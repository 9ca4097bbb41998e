"""Rebuild the demo base and its hidden person that ship inside the wheel, and their zoo entries.

    PYTHONPATH=. python bench/ship_demo_base.py      # a few minutes of CPU

Fits both from `my3dgen_cli/demo/base.py`'s recipe (FitConfig(), seed 0; what `my3dgen demo
--rebuild-base` fits) in a temporary MY3DGEN_HOME, copies them to `my3dgen_cli/demo_assets/` and
writes `zoo/demo-tiny-vN.toml` and `zoo/demo-tiny-vN-person.toml` with their sha256 and size.
Run it when the recipe changes (bump demo_base.RECIPE first), then re-measure the demo
(docs/demo.md, docs/benchmarks.md).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "my3dgen_cli" / "demo_assets"
LICENSE = "MIT (my3dgen; fitted by my3dgen_cli/demo/base.py to analytic heads, no face data)"


def entry(name: str, description: str, kind: str, file: Path, sha256: str, extra: str = "") -> str:
    return (f"# Built by bench/ship_demo_base.py from my3dgen_cli/demo/base.py; ships in the wheel.\n"
            f'name = "{name}"\ndescription = "{description}"\nkind = "{kind}"\n'
            f'url = "package://my3dgen_cli/demo_assets/{file.name}"\nmirrors = []\n'
            f'sha256 = "{sha256}"\nsize = {file.stat().st_size}\nformat = "safetensors"\n{extra}'
            f'license = "{LICENSE}"\nterms = "Ships with my3dgen; `my3dgen demo --rebuild-base` fits it again"\n')


def main() -> None:
    with tempfile.TemporaryDirectory() as home:
        os.environ["MY3DGEN_HOME"] = home
        sys.path.insert(0, str(ROOT))
        from my3dgen_cli.demo import base as db
        from my3dgen_cli.demo.run import build_demo_pair
        from my3dgen_cli.generators import local_bases_dir
        from my3dgen_cli.output import Output
        from my3dgen_cli.zoo.download import sha256_file

        name = db.SHIPPED_BASE
        person = build_demo_pair(name, db.FitConfig(), Output())
        ASSETS.mkdir(exist_ok=True)
        base_file, person_file = ASSETS / f"{name}.safetensors", ASSETS / f"{db.SHIPPED_PERSON}.safetensors"
        shutil.copyfile(local_bases_dir() / f"{name}.safetensors", base_file)
        shutil.copyfile(person, person_file)
    for file, toml in ((base_file, entry(name, "The demo's tiny synthetic base (tiny EG3D fitted to analytic heads)",
                                         "base-generator", base_file, sha256_file(base_file), 'config = "tiny"\n')),
                       (person_file, entry(db.SHIPPED_PERSON, f"The demo's hidden person: a rank-2 adapter on {name}",
                                           "other", person_file, sha256_file(person_file)))):
        (ROOT / "zoo" / f"{file.stem}.toml").write_text(toml, encoding="utf-8")
        print(f"{file.relative_to(ROOT)}: {file.stat().st_size} bytes")


if __name__ == "__main__":
    main()
