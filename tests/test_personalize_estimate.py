"""`personalize` says what the run will cost before it starts (issue 16, item 2).

Through the CLI on the tiny config: the estimate line is on stderr before the run, its counts are
the run's (--anchor-steps, --steps, photos), its times positive and consistent; with --json stdout
stays one JSON document and carries the same figures. The timing steps change nothing: a run with
the estimate gives the same anchors and adapter, bit for bit, as one without.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from my3dgen_cli import speed
from my3dgen_cli.errors import UserInputError
from my3dgen_cli.personalize.config import PersonalizeConfig
from my3dgen_cli.personalize.estimate import LONG_RUN_S, Estimate, duration
from tests.personalize_helpers import fresh, make_person, views, write_photos

ARGS = ["--base", "tiny-test", "--anchor-steps", "3", "--steps", "7", "--batch", "2", "--sym-every", "2",
        "--device", "cpu", "--checkpoint-every", "0"]
LINE = re.compile(r"estimate: anchors: ~[\d.]+ (s|min|hours) \((\d+) photos in (\d+) chunk\(s\) x (\d+) steps at "
                  r"([\d.]+) s/step\), training: ~[\d.]+ (s|min|hours) \((\d+) steps at ([\d.]+) s/step, ([\d.]+) s "
                  r"with the symmetry term\); total ~[\d.]+ (s|min|hours) on cpu")

pytestmark = pytest.mark.usefixtures("one_thread_offline")


@pytest.fixture(scope="module")
def person():
    return make_person()


@pytest.fixture
def photos(person, tmp_path):
    from my3dgen_cli.generators import save_local_base

    save_local_base(fresh(person), "tiny-test")
    return write_photos(person, tmp_path / "photos", [-30.0, -15.0, 0.0, 15.0, 30.0])


def _run(args: list[str]):
    from my3dgen_cli.cli import app

    result = CliRunner().invoke(app, ["personalize", *args])
    assert result.exit_code == 0, result.output
    return result


def test_the_estimate_line_matches_the_options(photos):
    result = _run([str(photos), "--name", "ana", *ARGS])
    lines = result.stderr.splitlines()
    found = [i for i, line in enumerate(lines) if LINE.search(line)]
    assert len(found) == 1, result.stderr
    m = LINE.search(lines[found[0]])
    photos_n, chunks, anchor_steps, anchor_s, steps, step_s, sym_s = (
        int(m[2]), int(m[3]), int(m[4]), float(m[5]), int(m[7]), float(m[8]), float(m[9]))
    assert (photos_n, chunks, anchor_steps, steps) == (5, 2, 3, 7)
    assert anchor_s > 0 and step_s > 0 and sym_s > 0
    # the CPU warning carries the measured figure, not a fixed "minutes per 100 steps"
    advice = [line for line in lines if "s per step measured" in line]
    assert advice and f"{step_s:.2f} s per step" in advice[0], result.stderr
    assert "minutes per 100 steps" not in result.stderr
    assert "identity ana" in result.stdout and "estimate:" not in result.stdout


def test_json_keeps_stdout_one_document_with_the_figures(photos):
    result = _run([str(photos), "--name", "ana", *ARGS, "--json"])
    data = json.loads(result.stdout)
    est = data["estimate"]
    assert est["photos"] == 5 and est["anchor_chunks"] == 2 and est["anchor_steps"] == 3 and est["train_steps"] == 7
    assert est["anchor_step_s"] > 0 and est["train_step_s"] > 0 and est["sym_step_s"] > 0
    assert est["anchors_s"] == pytest.approx(2 * 3 * est["anchor_step_s"])
    sym_steps = 4  # steps 0, 2, 4, 6 of 7 have the symmetry term
    extra = max(est["sym_step_s"] - est["train_step_s"], 0.0)
    assert est["training_s"] == pytest.approx(7 * est["train_step_s"] + sym_steps * extra)
    assert est["total_s"] == pytest.approx(est["anchors_s"] + est["training_s"])
    assert "estimate:" not in result.stderr  # human notes are off with --json


def test_the_timing_steps_change_no_result(person):
    from my3dgen_cli.adapter_file import read_adapter
    from my3dgen_cli.identity import identity_paths, read_anchors
    from my3dgen_cli.personalize.pipeline import LossNets, PersonalizeConfig, Photos, personalize

    _, w, hidden = person
    images, _, cams = views(hidden, w, [-30.0, 0.0, 10.0, 30.0, 40.0])
    config = PersonalizeConfig(steps=5, anchor_steps=3, batch=2, sym_every=2, sym_loss="lpips")
    made = {}
    for name, estimate in (("with", True), ("without", False)):
        result = personalize(Photos(images, cams, [f"p{i}" for i in range(5)]), name, config, base="tiny-test",
                             generator=fresh(person), nets=LossNets(None, None, None), estimate=estimate)
        assert (result.estimate is not None) == estimate
        ip = identity_paths(name)
        made[name] = (read_anchors(ip.anchors).ws, read_adapter(ip.adapter).tensors)
    (ws_a, adapter_a), (ws_b, adapter_b) = made["with"], made["without"]
    assert torch.equal(ws_a, ws_b)
    assert adapter_a.keys() == adapter_b.keys() and all(torch.equal(adapter_a[k], adapter_b[k]) for k in adapter_a)


def test_no_estimate_skips_the_timing_and_json_carries_null(photos, monkeypatch):
    from my3dgen_cli.adapter_file import read_adapter
    from my3dgen_cli.identity import identity_paths
    from my3dgen_cli.personalize import estimate

    def no_timing(*args, **kwargs):
        raise AssertionError("--no-estimate ran the timing steps")

    monkeypatch.setattr(estimate, "measure_run", no_timing)
    monkeypatch.setattr(speed, "cpu_has_bf16_kernels", lambda: True)  # the flag's wiring, on any CPU
    data = json.loads(_run([str(photos), "--name", "ana", *ARGS, "--no-estimate", "--amp", "bf16", "--json"]).stdout)
    assert data["estimate"] is None and data["steps"] == 7
    config = read_adapter(identity_paths("ana").adapter).extra["config"]
    assert (config["estimate"], config["amp"]) == (False, "bf16")  # --amp bf16 trains in bf16 autocast
    human = _run([str(photos), "--name", "bob", *ARGS, "--no-estimate"])
    assert "estimate:" not in human.stderr and "identity bob" in human.stdout
    assert read_adapter(identity_paths("bob").adapter).extra["config"]["amp"] is False  # --amp off (the default)


def test_the_config_switch_turns_the_library_estimate_off(person):
    from my3dgen_cli.personalize.pipeline import LossNets, PersonalizeConfig, Photos, personalize

    _, w, hidden = person
    images, _, cams = views(hidden, w, [-30.0, 0.0, 30.0])
    for on in (True, False):
        config = PersonalizeConfig(steps=2, anchor_steps=1, batch=2, sym=False, estimate=on)
        result = personalize(Photos(images, cams, ["a", "b", "c"]), f"p{on}", config, base="tiny-test",
                             generator=fresh(person), nets=LossNets(None, None, None), estimate=True)
        assert (result.estimate is not None) == on
    with pytest.raises(UserInputError, match="estimate: got 'no'"):
        PersonalizeConfig(estimate="no")


def test_without_symmetry_the_trial_is_two_steps(person, monkeypatch):
    from my3dgen_cli.personalize import estimate, training

    _, w, hidden = person
    images, _, cams = views(hidden, w, [-30.0, 0.0, 30.0])
    G = fresh(person)
    ws = w.expand(3, -1, -1)
    real, ran = training.train_adapter, []

    def counted(*args, **kwargs):
        ran.append(args[4].steps)
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "train_adapter", counted)
    for sym in (True, False):
        config = PersonalizeConfig(steps=9, batch=2, sym=sym, sym_loss="lpips").train_config()
        plain, with_sym = estimate.time_training_steps(G, images, cams, ws, config, None, None)
        assert plain > 0 and with_sym > 0 and (sym or with_sym == plain)
    assert ran == [3, 2]
    assert not [n for n, _ in G.named_modules() if n.endswith(".adapter")]  # the trial trains a copy: G has none


def test_a_long_cpu_run_says_hours_and_what_helps():
    slow = Estimate("cpu", 10, 300, 3, 2.5, 3 * 300 * 2.5, 1000, 9.0, 12.0, 1000 * 9.0 + 250 * 3.0)
    assert slow.total_s > LONG_RUN_S
    advice = slow.cpu_advice()
    assert "hours" in advice and "--budget quick" in advice and "GPU" in advice and "9.00 s per training step" in advice
    assert "anchors: ~38 min" in slow.line() and "training: ~2.7 hours" in slow.line()
    assert Estimate("cuda", 10, 300, 3, 0.1, 90.0, 1000, 0.2, 0.3, 225.0).cpu_advice() is None
    assert [duration(s) for s in (12, 600, 9000)] == ["12 s", "10 min", "2.5 hours"]


def test_resume_refuses_anchors_of_other_photos_before_timing_anything(photos, person, monkeypatch):
    """An interrupted build's complete anchors for 4 photos, resumed with 5: one line, and no timing step ran first."""
    from my3dgen_cli.cli import app
    from my3dgen_cli.identity import Anchors, build_paths, write_anchors
    from my3dgen_cli.personalize import estimate

    _, w, _ = person
    ip = build_paths("ana")
    ip.root.mkdir(parents=True)
    cams = views(fresh(person), w, [-30.0, -15.0, 0.0, 15.0])[2]
    write_anchors(ip.anchors, Anchors(w.expand(4, -1, -1).clone(), cams, ["a", "b", "c", "d"], {"base": "tiny-test"}))

    def no_timing(*args, **kwargs):
        raise AssertionError("the estimate ran before the saved anchors were checked")

    monkeypatch.setattr(estimate, "measure_run", no_timing)
    result = CliRunner().invoke(app, ["personalize", str(photos), "--name", "ana", *ARGS, "--resume"])
    assert result.exit_code != 0
    assert result.output.strip().splitlines()[-1].endswith("the saved anchors hold 4 photos, got 5"), result.output
    assert "estimate:" not in result.output and "Traceback" not in result.output
