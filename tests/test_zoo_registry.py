"""Every packaged registry entry is well formed (each new TOML file is tested for free)."""

from __future__ import annotations

from pathlib import Path

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

import pytest

from my3dgen_cli import zoo
from my3dgen_cli.errors import UserInputError
from my3dgen_cli.zoo.registry import FIELDS, load_registry, packaged_registry_dir

ROOT = Path(__file__).resolve().parents[1]
PACKAGED = sorted(p.stem for p in (ROOT / "zoo").glob("*.toml"))
NGC = "https://api.ngc.nvidia.com/v2/models/nvidia/research/eg3d/versions/1/files/{}.pkl"


def test_registry_is_read_from_the_top_level_zoo_folder() -> None:
    assert packaged_registry_dir().resolve() == (ROOT / "zoo").resolve()
    assert {
        "eg3d-ffhq512-128", "eg3d-ffhqrebalanced512-128", "eg3d-ffhqrebalanced512-64", "eg3d-afhqcats512-128",
        "lpips-alexnet", "lpips-vgg16", "arcface-ir-se50", "mtcnn-pnet", "mtcnn-rnet", "mtcnn-onet",
        "demo-tiny-v2", "demo-tiny-v2-person",
    } == set(PACKAGED)  # fmt: skip


def test_wheel_maps_zoo_into_the_package() -> None:
    setup = (ROOT / "setup.py").read_text()
    assert '"my3dgen_cli.zoo_registry_data": "zoo"' in setup
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["package-data"]["my3dgen_cli.zoo_registry_data"] == ["*.toml"]


@pytest.mark.parametrize("name", PACKAGED)
def test_packaged_entry(name: str) -> None:
    raw = tomllib.loads((ROOT / "zoo" / f"{name}.toml").read_text())
    assert raw["name"] == name, "one file per artifact, named after it"
    assert set(raw) <= set(FIELDS)
    entry = zoo.get_entry(name)
    assert entry.description and entry.license and entry.terms
    assert all(u.startswith(("https://", "package://")) for u in entry.urls)
    if entry.url.startswith("package://"):
        assert entry.sha256 and entry.size, "files inside a wheel have a known hash"
    if entry.kind == "base-generator" and entry.url.startswith("package://"):  # the demo's, in the wheel
        assert entry.format == "safetensors" and entry.config == "tiny"
    elif entry.kind == "base-generator":
        assert entry.format == "eg3d-pkl" and entry.url == NGC.format(entry.config)
        assert entry.sha256 is None, "unpublished: recorded on first fetch"
    if entry.kind == "lpips-backbone":
        assert entry.url.startswith("https://download.pytorch.org/models/")
        # torchvision names the file after its hash; the full hash lets torch hub's copy be reused
        assert entry.sha256 and entry.size and entry.sha256[:8] in entry.url


def test_bad_extra_registry_names_the_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "lab.toml"
    monkeypatch.setenv("MY3DGEN_REGISTRY", str(bad))
    bad.write_text('name = "x"\nurl = "https://example.org/x"\nsha265 = "typo"\n')
    with pytest.raises(UserInputError, match="unknown field 'sha265'"):
        load_registry()
    bad.write_text('name = "x"\nurl = "ftp://example.org/x"\n')
    with pytest.raises(UserInputError, match="url: got 'ftp://example.org/x'"):
        load_registry()
    bad.write_text(
        'name = "x"\nurl = "https://example.org/x"\nkind = "base-generator"\nformat = "eg3d-pkl"\n'
    )
    with pytest.raises(UserInputError, match="config"):
        load_registry()
