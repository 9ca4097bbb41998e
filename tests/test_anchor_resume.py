"""An interrupt in the anchor stage of `my3dgen personalize` loses at most the chunk in flight.

The real CLI on the tiny config (CPU): 9 photos = anchor chunks of 4, 4 and 1. A Ctrl-C during
chunk 2 exits 130 and leaves the 4 anchors of chunk 1 in the partial-anchors file; `--resume`
projects only chunks 2 and 3 (project_to_w calls counted) and ends with the same anchors and
adapter, bit for bit, as an uninterrupted run. A partial file from other settings or photos is
refused with a one-line error, and a run with --force starts over.
"""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from my3dgen_cli.personalize import anchors
from my3dgen_cli.personalize.estimate import in_trial
from tests.personalize_helpers import TRAIN_YAWS, fresh, make_person, write_photos

YAWS = TRAIN_YAWS + [50.0]  # 9 photos: chunks of 4, 4, 1
ARGS = ["--base", "tiny-test", "--steps", "3", "--anchor-steps", "3", "--batch", "2", "--sym-every", "2",
        "--device", "cpu", "--checkpoint-every", "0", "--json"]


pytestmark = pytest.mark.usefixtures("one_thread_offline")


@pytest.fixture(scope="module")
def person():
    return make_person()


class CountingProjector:
    """Wraps anchors.project_to_w: records each call's photo count; Ctrl-C inside call `stop_at` (1-based)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real = anchors.project_to_w
        self.calls: list[int] = []
        self.stop_at: int | None = None
        monkeypatch.setattr(anchors, "project_to_w", self)

    def __call__(self, G, images, cameras, steps, *args, on_step=None, **kwargs):
        if in_trial():  # the estimate's timing steps (estimate.py), not a chunk's projection
            return self.real(G, images, cameras, steps, *args, on_step=on_step, **kwargs)
        self.calls.append(images.shape[0])
        if len(self.calls) == self.stop_at:
            def on_step(step: int, loss: float) -> None:  # the user presses Ctrl-C after step 1 of this chunk
                raise KeyboardInterrupt
        return self.real(G, images, cameras, steps, *args, on_step=on_step, **kwargs)


@pytest.fixture
def photos(person, tmp_path):
    from my3dgen_cli.generators import save_local_base

    save_local_base(fresh(person), "tiny-test")
    return write_photos(person, tmp_path / "photos", YAWS)


def _run(args: list[str]):
    from my3dgen_cli.cli import app

    return CliRunner().invoke(app, ["personalize", *args])


def _interrupted(photos, counter: CountingProjector, name: str = "ana") -> None:
    """Run `personalize` and press Ctrl-C during anchor chunk 2."""
    from my3dgen_cli.identity import build_paths, identity_paths, read_partial_anchors

    counter.stop_at = 2
    result = _run([str(photos), "--name", name, *ARGS])
    counter.stop_at = None
    assert result.exit_code == 130, result.output
    message = result.output.strip().splitlines()[-1]
    assert "interrupted while projecting anchors" in message and "4 of 9 photos" in message, message
    assert "--resume" in message and "Traceback" not in result.output
    ip = build_paths(name)  # the run builds beside the identity; nothing of it is an identity yet
    saved = read_partial_anchors(ip.partial_anchors)
    assert saved is not None and saved.ws.shape[0] == 4
    assert not ip.anchors.exists() and not ip.adapter.exists() and not identity_paths(name).root.exists()
    assert counter.calls == [4, 4]


def test_resume_after_anchor_interrupt_projects_only_missing_chunks(photos, monkeypatch):
    from my3dgen_cli.adapter_file import read_adapter
    from my3dgen_cli.identity import build_paths, identity_paths, read_anchors, read_partial_anchors

    counter = CountingProjector(monkeypatch)
    _interrupted(photos, counter)
    counter.calls.clear()
    again = _run([str(photos), "--name", "ana", *ARGS])  # the same command without --resume keeps the work
    assert again.exit_code != 0 and "--resume" in again.output and "--force" in again.output, again.output
    assert counter.calls == [] and read_partial_anchors(build_paths("ana").partial_anchors).ws.shape[0] == 4
    resumed = _run([str(photos), "--name", "ana", *ARGS, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert counter.calls == [4, 1]  # chunks 2 and 3; chunk 1 came from the partial file
    ip = identity_paths("ana")
    assert ip.adapter.is_file() and not ip.checkpoints.exists() and not build_paths("ana").root.exists()

    counter.calls.clear()
    whole = _run([str(photos), "--name", "one-go", *ARGS])
    assert whole.exit_code == 0, whole.output
    assert counter.calls == [4, 4, 1]
    anchors_a = read_anchors(ip.anchors)
    ws_a, cams_a, names_a = anchors_a.ws, anchors_a.cameras, anchors_a.photos
    anchors_b = read_anchors(identity_paths("one-go").anchors)
    ws_b, cams_b, names_b = anchors_b.ws, anchors_b.cameras, anchors_b.photos
    assert names_a == names_b and torch.equal(cams_a, cams_b)
    assert torch.equal(ws_a, ws_b)  # bit-identical: a chunk's projection does not depend on the process
    adapter_a, adapter_b = read_adapter(ip.adapter).tensors, read_adapter(identity_paths("one-go").adapter).tensors
    assert adapter_a.keys() == adapter_b.keys()
    assert all(torch.equal(adapter_a[k], adapter_b[k]) for k in adapter_a)
    assert any(t.abs().sum() > 0 for k, t in adapter_a.items() if "lora_B" in k)


def test_mismatched_partial_anchors_are_refused_not_reused(photos, monkeypatch):
    from my3dgen_cli.identity import build_paths

    counter = CountingProjector(monkeypatch)
    _interrupted(photos, counter)
    counter.calls.clear()
    steps = [*ARGS]
    steps[steps.index("--anchor-steps") + 1] = "2"
    other = _run([str(photos), "--name", "ana", *steps, "--resume"])
    assert other.exit_code == 2 and "Traceback" not in other.output
    line = other.output.strip().splitlines()[-1]
    assert "anchor_steps=3" in line and "anchor_steps=2" in line and "--force instead of --resume" in line, line
    (photos / "view8.png").unlink()  # one photo fewer (it is skipped: not on disk, still in dataset.json)
    fewer = _run([str(photos), "--name", "ana", *ARGS, "--resume"])
    assert fewer.exit_code == 2 and "9 photos, this run has 8" in fewer.output.strip().splitlines()[-1], fewer.output
    assert counter.calls == []  # nothing projected from a stale file
    assert build_paths("ana").partial_anchors.is_file()  # a refused resume keeps the user's file
    fresh_run = _run([str(photos), "--name", "ana", *ARGS, "--force"])  # --force: starts over
    assert fresh_run.exit_code == 0, fresh_run.output
    assert counter.calls == [4, 4]


def test_interrupt_before_the_first_chunk_says_start_over(photos, monkeypatch):
    counter = CountingProjector(monkeypatch)
    counter.stop_at = 1
    result = _run([str(photos), "--name", "ana", *ARGS])
    assert result.exit_code == 130
    assert "start over" in result.output.strip().splitlines()[-1]
    resumed = _run([str(photos), "--name", "ana", *ARGS, "--resume"])
    assert resumed.exit_code == 2 and "no checkpoint to continue from" in resumed.output


def test_anchor_batch_sets_the_chunks_and_what_resume_accepts(person, monkeypatch, tmp_path) -> None:
    """PersonalizeConfig.anchor_batch: 9 photos in chunks of 3 (the demo projects all 10 at once); the same anchors
    as chunks of 4 to float rounding; a partial file from another chunk size is refused on resume."""
    from my3dgen_cli.errors import UserInputError
    from my3dgen_cli.personalize.anchor_chunks import anchor_fingerprint, project_anchors
    from my3dgen_cli.personalize.pipeline import PersonalizeConfig
    from tests.personalize_helpers import views

    _, w, hidden = person
    images, _, cams = views(hidden, w, YAWS)
    G = fresh(person)
    counter = CountingProjector(monkeypatch)
    by = {}
    for batch in (3, 4):
        config = PersonalizeConfig(anchor_steps=3, anchor_batch=batch)
        counter.calls.clear()
        by[batch] = project_anchors(G, images, cams, config, None)
        assert counter.calls == ([3, 3, 3] if batch == 3 else [4, 4, 1])
    # Adam divides each entry's gradient by that entry's own running scale, so float-order noise in the renders
    # moves entries whose gradient is near zero by up to ~1e-4 in 3 steps; a chunking bug moves them by ~lr (1e-2).
    torch.testing.assert_close(by[3], by[4], atol=1e-4, rtol=0)

    partial = tmp_path / "partial.safetensors"
    three = PersonalizeConfig(anchor_steps=3, anchor_batch=3)
    counter.calls.clear()
    counter.stop_at = 2
    with pytest.raises(Exception, match="interrupted"):
        project_anchors(G, images, cams, three, None, partial=partial,
                        fingerprint=anchor_fingerprint(three, list(map(str, YAWS)), "b", "s", None))
    counter.stop_at = None
    four = PersonalizeConfig(anchor_steps=3, anchor_batch=4)
    with pytest.raises(UserInputError, match="chunk=3, this run has chunk=4"):
        project_anchors(G, images, cams, four, None, partial=partial, resume=True,
                        fingerprint=anchor_fingerprint(four, list(map(str, YAWS)), "b", "s", None))
    with pytest.raises(UserInputError, match="anchor_batch"):
        PersonalizeConfig(anchor_batch=0)


def test_resume_with_other_photos_of_the_same_count_is_refused(photos, monkeypatch, tmp_path):
    """The interrupted run's finished anchors belong to its photos: `--resume` with other photos (the same
    number) once trained them against those latents and reported success."""
    import json
    import shutil

    from my3dgen_cli.identity import build_paths

    monkeypatch.setenv("MY3DGEN_TEST_FAIL", "0:swap:0")  # stops with the anchors (and the adapter) finished
    assert _run([str(photos), "--name", "ana", *ARGS]).exit_code != 0
    monkeypatch.delenv("MY3DGEN_TEST_FAIL")
    assert build_paths("ana").anchors.is_file()
    other = tmp_path / "other"
    other.mkdir()
    labels = json.loads((photos / "dataset.json").read_text())
    for entry in labels["labels"]:
        shutil.copyfile(photos / entry[0], other / f"b_{entry[0]}")
        entry[0] = f"b_{entry[0]}"
    (other / "dataset.json").write_text(json.dumps(labels))
    result = _run([str(other), "--name", "ana", *ARGS, "--resume"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "projected other photos" in result.output.strip().splitlines()[-1]
    assert _run([str(photos), "--name", "ana", *ARGS, "--resume"]).exit_code == 0  # its own photos still resume
