"""Seed and anchor lists: EG3D's gen_samples.py forms (0-3, 1,5,9) beside ours (0:3), both ends inclusive."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from my3dgen_cli.cli import app
from my3dgen_cli.commands.options import MAX_INDICES, MAX_SEED, expand_keys, parse_indices
from my3dgen_cli.errors import UserInputError
from tests.render_fixtures import tiny_base  # noqa: F401

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


def test_eg3d_forms_and_ours_include_both_ends() -> None:
    assert parse_indices("7") == [7]
    assert parse_indices("0-3") == [0, 1, 2, 3]  # gen_samples.py --seeds=0-3
    assert parse_indices("1,5,9") == [1, 5, 9]
    assert parse_indices("0-2,7") == [0, 1, 2, 7]
    assert parse_indices("0:3") == [0, 1, 2, 3]  # ours, as before: inclusive too
    assert parse_indices("4:4") == parse_indices("4-4") == [4]
    assert parse_indices(" 9, 2-3 ,0:1") == [9, 2, 3, 0, 1]  # order kept, spaces forgiven
    assert parse_indices(f"{MAX_SEED}") == [MAX_SEED]
    assert len(parse_indices(f"0-{MAX_INDICES - 1}")) == MAX_INDICES


@pytest.mark.parametrize(("spec", "says"), [
    ("3-1", "START <= END"),
    ("3:1", "START <= END"),
    ("a-b", "expected 7, 1,5,9, 0-3 or 0:3 (ranges include both ends)"),
    ("", "expected"),
    ("1,", "expected"),
    ("-3", "expected"),
    ("1.5", "expected"),
    ("0-3-5", "expected"),
    ("0:10:2", "expected"),
    ("1" * 30, "expected"),
    (f"{MAX_SEED + 1}", f"at most {MAX_SEED}"),
    ("0-999999999", f"more than {MAX_INDICES}"),
    (f"0-{MAX_INDICES - 1},{MAX_INDICES}", f"more than {MAX_INDICES}"),
    ("0-3,2", "2 is given twice"),
])
def test_bad_lists_are_one_line_errors(spec: str, says: str) -> None:
    with pytest.raises(UserInputError, match="^--seed: ") as err:
        parse_indices(spec, "--seed")
    assert says in str(err.value) and "\n" not in str(err.value)


def test_latent_keys_spread_seed_and_anchor_lists() -> None:
    assert expand_keys(["seed:0-2", "a.latent", "anchor:1,4", "seed:5"]) == [
        "seed:0", "seed:1", "seed:2", "a.latent", "anchor:1", "anchor:4", "seed:5"]
    with pytest.raises(UserInputError, match="^latent seed:3-1: "):
        expand_keys(["seed:3-1"])


@pytest.mark.usefixtures("tiny_base")
def test_render_accepts_eg3d_seed_lists(tmp_path: Path) -> None:
    out = tmp_path / "r"
    r = runner.invoke(app, ["render", "--seed", "0-2,7", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert [s["source"] for s in json.loads(r.stdout)["sources"]] == ["seed0", "seed1", "seed2", "seed7"]
    assert sorted(p.name for p in out.glob("*.png")) == [f"seed{s}_yaw+000_pitch+000.png" for s in (0, 1, 2, 7)]
    same = runner.invoke(app, ["render", "--seed", "0:2,7", "-o", str(tmp_path / "r2"), "--json"])
    assert [s["source"] for s in json.loads(same.stdout)["sources"]] == ["seed0", "seed1", "seed2", "seed7"]
    assert (out / "seed2_yaw+000_pitch+000.png").read_bytes() == (tmp_path / "r2" / "seed2_yaw+000_pitch+000.png"
                                                                  ).read_bytes()


@pytest.mark.usefixtures("tiny_base")
@pytest.mark.parametrize("spec", ["3-1", "a-b", "0-99999999999", "1,1"])
def test_render_bad_seed_list_exits_with_one_line(spec: str, tmp_path: Path) -> None:
    r = runner.invoke(app, ["render", "--seed", spec, "-o", str(tmp_path / "r")])
    assert r.exit_code == 2, r.output
    assert r.output.strip().count("\n") == 0 and "--seed" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "r").exists()


@pytest.mark.usefixtures("tiny_base")
def test_interpolate_accepts_a_seed_range(tmp_path: Path) -> None:
    r = runner.invoke(app, ["interpolate", "seed:1-3", "--frames", "5", "-o", str(tmp_path / "m"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["keys"] == ["seed1", "seed2", "seed3"]
    r = runner.invoke(app, ["interpolate", "seed:3-1", "seed:4", "-o", str(tmp_path / "n")])
    assert r.exit_code == 2 and "START <= END" in r.output


def test_help_says_which_ends_are_inclusive() -> None:
    for command in ("render", "interpolate"):
        r = runner.invoke(app, [command, "--help"], terminal_width=200)
        assert r.exit_code == 0
        text = " ".join(r.output.split())
        assert "0-3" in text and "include both ends" in text, command
