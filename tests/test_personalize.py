"""Personalization on the tiny config (CPU): adapters only, a hidden "person" recovered, exact resume, CLI errors.

The "person" is the tiny base plus a hidden rank-1 adapter with non-zero B; its views (with the true
latent as anchor) are the training photos. LPIPS uses a random backbone or is off (offline tests).
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from typer.testing import CliRunner

from my3dgen_cli.adapter_file import load_adapter
from my3dgen_cli.eg3d import build_generator
from my3dgen_cli.eg3d.camera import lookat_camera
from my3dgen_cli.lora import (
    adapter_layers,
    add_adapters,
    count_adapter_parameters,
    extra_names,
    remove_adapters,
)
from my3dgen_cli.personalize import training
from my3dgen_cli.personalize.pipeline import LossNets, PersonalizeConfig, Photos, describe_identity, personalize
from my3dgen_cli.personalize.symmetry import lpips_distance, mirror_pair, mse_distance, symmetry_loss
from my3dgen_cli.personalize.training import TrainingInterrupted, train_adapter
from tests.personalize_helpers import TRAIN_YAWS, fresh, make_person, tiny_base, views, write_photos

HELD_OUT_YAWS = [-75.0, -55.0, 55.0, 75.0]


pytestmark = pytest.mark.usefixtures("one_thread_offline")


def _base(seed: int = 0):
    return tiny_base(seed)


@pytest.fixture(scope="module")
def person():
    """(base state dict, true w [1, num_ws, w_dim], person generator with a hidden adapter)."""
    return make_person()


def _views(M, w, yaws):
    return views(M, w, yaws)


def _fresh(person):
    return fresh(person)


def test_fresh_adapter_leaves_outputs_bit_identical(person):
    G = _fresh(person)
    w = person[1]
    before = _views(G, w, [-30.0, 20.0])
    add_adapters(G, rank=1, generator=torch.Generator().manual_seed(0))
    after = _views(G, w, [-30.0, 20.0])
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_training_changes_only_adapters_and_recovers_the_person(person):
    state, w, hidden = person
    G = _fresh(person)
    images, raws, cams = _views(hidden, w, TRAIN_YAWS)
    target, _, _ = _views(hidden, w, HELD_OUT_YAWS)
    base_err = float(((_views(G, w, HELD_OUT_YAWS)[0] - target) ** 2).mean())
    config = PersonalizeConfig(steps=25, batch=2, sym=False)
    result = train_adapter(G, images, cams, w.expand(len(TRAIN_YAWS), -1, -1), config, lpips=None, raw_images=raws)
    tuned_err = float(((_views(G, w, HELD_OUT_YAWS)[0] - target) ** 2).mean())
    # Held-out views (55-75 degrees, never trained on): the hidden change is mostly recovered.
    assert tuned_err < 0.3 * base_err, (base_err, tuned_err)
    assert result.log[-1]["loss"] < result.log[0]["loss"]
    trained = set(extra_names(G))  # by default My3DGen's extras (biases, noise strengths, const) train too
    assert trained and "backbone.synthesis.b4.const" in trained
    for name, tensor in G.state_dict().items():
        if ".adapter." in name or name in trained:
            continue
        assert torch.equal(tensor, state[name]), f"base tensor {name} changed"
    assert any(a.lora_B.abs().sum() > 0 for a in adapter_layers(G).values())
    assert result.parameters == count_adapter_parameters(G)
    remove_adapters(G)
    assert all(torch.equal(t, state[k]) for k, t in G.state_dict().items()), "unloading restores the base"


def test_symmetry_term_is_differentiable_and_lowers_mirror_inconsistency(person):
    from my3dgen_cli.losses.perceptual import build_lpips

    G = _fresh(person)
    w = person[1]
    params = add_adapters(G, rank=1, generator=torch.Generator().manual_seed(0))
    distance = lpips_distance(build_lpips("alex", None))
    cams = lookat_camera(torch.tensor([30.0, -20.0]), 0.0)
    ws = w.expand(2, -1, -1)
    first = symmetry_loss(G, ws, cams, distance)
    first.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    opt = torch.optim.Adam(params, lr=0.0025, betas=(0.0, 0.99))
    for _ in range(8):
        opt.zero_grad()
        symmetry_loss(G, ws, cams, distance).backward()
        opt.step()
    with torch.no_grad():
        last = symmetry_loss(G, ws, cams, distance)
        a, b = mirror_pair(G, ws, cams)
    assert float(last) < 0.8 * float(first.detach()), (float(first.detach()), float(last))
    assert float(mse_distance()(a, b)) >= 0


def test_identity_distance_arcface_names_and_gradient():
    from my3dgen_cli.losses.arcface import build_arcface
    from my3dgen_cli.personalize.symmetry import identity_distance

    net = build_arcface(None)
    names = net.state_dict()
    # TreB1eN's model_ir_se50.pth names (and shapes) for a few landmark tensors.
    assert tuple(names["input_layer.0.weight"].shape) == (64, 3, 3, 3)
    assert "body.0.shortcut_layer.0.weight" not in names  # same width: MaxPool2d(1, 2) shortcut
    assert tuple(names["body.3.shortcut_layer.0.weight"].shape) == (128, 64, 1, 1)
    assert tuple(names["body.23.res_layer.5.fc1.weight"].shape) == (32, 512, 1, 1)
    assert tuple(names["output_layer.3.weight"].shape) == (512, 512 * 7 * 7)
    assert len([k for k in names if k.startswith("body.") and k.endswith("res_layer.1.weight")]) == 24
    x = torch.rand(2, 3, 64, 64, requires_grad=True)
    d = identity_distance(net)
    loss = d(x * 2 - 1, (x * 2 - 1).flip(-1))
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert float(d(x.detach(), x.detach())) == pytest.approx(0.0, abs=1e-5)


def _train(person, config, tmp_path, stop_at=None, resume=False):
    from my3dgen_cli.losses.perceptual import build_lpips

    _, w, hidden = person
    G = _fresh(person)
    images, raws, cams = _views(hidden, w, TRAIN_YAWS[:4])

    def on_step(step, record):
        if stop_at is not None and step == stop_at:
            raise KeyboardInterrupt

    result = train_adapter(G, images, cams, w.expand(4, -1, -1), config, lpips=build_lpips("alex", None),
                           sym_distance=mse_distance(), checkpoint_dir=tmp_path / "ckpt", resume=resume,
                           on_step=on_step, raw_images=raws)
    return G, result


def test_interrupt_and_resume_equal_an_uninterrupted_run(person, tmp_path):
    config = PersonalizeConfig(steps=6, batch=2, sym=True, sym_every=2, checkpoint_every=2, seed=3)
    G_full, full = _train(person, config, tmp_path / "a")
    with pytest.raises(TrainingInterrupted) as info:
        _train(person, config, tmp_path / "b", stop_at=3)
    assert info.value.step == 3 and info.value.exit_code == 130 and "--resume" in str(info.value)
    G_resumed, resumed = _train(person, config, tmp_path / "b", resume=True)
    assert resumed.resumed_from == 3
    assert resumed.log == full.log
    for (name, a), b in zip(adapter_layers(G_full).items(), adapter_layers(G_resumed).values(), strict=True):
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B), name
    with pytest.raises(ValueError, match="batch=2"):
        changed = PersonalizeConfig(steps=6, batch=1, sym=True, sym_every=2, checkpoint_every=2, seed=3)
        _train(person, changed, tmp_path / "b", resume=True)


@pytest.mark.parametrize("where", ["gradients", "update"])
def test_a_second_ctrl_c_mid_step_still_resumes_exactly(person, tmp_path, monkeypatch, where):
    """Two Ctrl-Cs inside step 3: after its gradients (its batch and cameras already drawn), the checkpoint
    rewinds the draws to the step's start; during its update, the update and the step count finish first."""
    config = PersonalizeConfig(steps=6, batch=2, sym=True, sym_every=2, checkpoint_every=2, seed=3)
    G_full, full = _train(person, config, tmp_path / "a")
    real = getattr(training, f"_{where}")

    def interrupted_twice(loop, step, *args):
        if step != 2:
            return real(loop, step, *args)
        if where == "gradients":
            out = real(loop, step, *args)
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        return out if where == "gradients" else real(loop, step, *args)

    monkeypatch.setattr(training, f"_{where}", interrupted_twice)
    with pytest.raises(TrainingInterrupted) as info:
        _train(person, config, tmp_path / "b")
    assert info.value.step == (2 if where == "gradients" else 3)
    monkeypatch.setattr(training, f"_{where}", real)
    G_resumed, resumed = _train(person, config, tmp_path / "b", resume=True)
    assert resumed.log == full.log
    for (name, a), b in zip(adapter_layers(G_full).items(), adapter_layers(G_resumed).values(), strict=True):
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B), name


def test_a_ctrl_c_while_the_interrupt_checkpoint_is_written_keeps_it(person, tmp_path, monkeypatch):
    """The first Ctrl-C stops after step 3; a second one lands as the checkpoint is written: it is still written."""
    config = PersonalizeConfig(steps=6, batch=2, sym=True, sym_every=2, checkpoint_every=0, seed=3)
    G_full, full = _train(person, config, tmp_path / "a")
    real_update, real_keep = training._update, training.keep_checkpoint

    def first(loop, step, *args):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_update(loop, step, *args)

    def second(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real_keep(*args, **kwargs)

    monkeypatch.setattr(training, "_update", first)
    monkeypatch.setattr(training, "keep_checkpoint", second)
    with pytest.raises(TrainingInterrupted) as info:
        _train(person, config, tmp_path / "b")
    assert info.value.step == 3 and info.value.path is not None and info.value.path.exists()
    monkeypatch.setattr(training, "_update", real_update)
    monkeypatch.setattr(training, "keep_checkpoint", real_keep)
    G_resumed, resumed = _train(person, config, tmp_path / "b", resume=True)
    assert resumed.resumed_from == 3 and resumed.log == full.log


def test_personalize_writes_identity_folder_and_round_trips(person):
    from my3dgen_cli.losses.perceptual import build_lpips

    _, w, hidden = person
    G = _fresh(person)
    images, _, cams = _views(hidden, w, TRAIN_YAWS[:3])
    photos = Photos(images, cams, ["a", "b", "c"])
    lp = build_lpips("alex", None)
    config = PersonalizeConfig(steps=4, anchor_steps=3, batch=2, sym_every=2, sym_loss="lpips")
    result = personalize(photos, "ana", config, base="tiny-test", generator=G, nets=LossNets(lp, lp, None))
    folder = result.folder
    for rel in ("adapter.safetensors", "anchors.safetensors", "previews/grid.png", "log.json", "loss.png"):
        assert (folder / rel).is_file(), rel
    assert not (folder / "checkpoints").exists()
    assert result.parameters == count_adapter_parameters(G) and result.sym_loss == "lpips"
    assert len(json.loads((folder / "log.json").read_text())["steps"]) == 4
    info = describe_identity("ana")
    assert info["base"] == "tiny-test" and info["photos"] == 3 and info["parameters"] == result.parameters
    # Round trip: the saved adapter on a fresh base renders exactly what the trained generator renders.
    G2 = _fresh(person)
    adapter = load_adapter(G2, folder / "adapter.safetensors")
    assert adapter.extra["config"]["steps"] == 4
    assert all(torch.equal(a, b) for a, b in zip(_views(G, w, [25.0]), _views(G2, w, [25.0]), strict=True))
    with pytest.raises(ValueError, match="already exists"):
        personalize(photos, "ana", config, base="tiny-test", generator=_fresh(person), nets=LossNets(lp, lp, None))
    with pytest.raises(ValueError, match="no checkpoint"):
        personalize(photos, "ana", config, base="tiny-test", generator=_fresh(person), nets=LossNets(lp, lp, None),
                    resume=True)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="rank: got 0"):
        PersonalizeConfig(rank=0)
    with pytest.raises(ValueError, match="sym_loss"):
        PersonalizeConfig(sym_loss="arc")
    assert PersonalizeConfig.from_dict(PersonalizeConfig(rank=2).to_dict()) == PersonalizeConfig(rank=2)


# --- CLI ---------------------------------------------------------------------------------------


def _cli(args):
    from my3dgen_cli.cli import app

    return CliRunner().invoke(app, args)


def _one_line_error(result):
    text = result.output.strip()
    assert result.exit_code != 0
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    return text


def test_cli_missing_photo_folder_is_one_line(tmp_path):
    text = _one_line_error(_cli(["personalize", str(tmp_path / "nope"), "--name", "x"]))
    assert "does not exist" in text


def test_cli_empty_photo_folder_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no photos here")
    text = _one_line_error(_cli(["personalize", str(tmp_path / "empty"), "--name", "x"]))
    assert "no image files" in text


def test_a_run_that_fails_before_saving_anything_leaves_no_unfinished_identity(person, tmp_path):
    """A failed personalize with nothing to continue from (an unknown base) once left an empty `.NAME.build` that
    `identities` listed as UNFINISHED with advice to --resume, which then failed."""
    from my3dgen_cli.paths import identities_dir

    photos = write_photos(person, tmp_path / "photos", TRAIN_YAWS[:3])
    assert "no-such-base" in _one_line_error(_cli(["personalize", str(photos), "--name", "bo", "--base",
                                                   "no-such-base"]))
    assert not list(identities_dir().glob("*bo*"))
    listing = _cli(["identities"])
    assert listing.exit_code == 0 and "bo" not in listing.output.split(), listing.output


def test_cli_bad_name_and_flags_are_one_line(tmp_path):
    assert "identity name" in _one_line_error(_cli(["personalize", str(tmp_path), "--name", "a/b"]))
    assert "--resume" in _one_line_error(_cli(["personalize", str(tmp_path), "--name", "x", "--resume", "--force"]))


def test_cli_identities_lists_json(person):
    from my3dgen_cli.losses.perceptual import build_lpips

    assert "no identities" in _cli(["identities"]).output
    _, w, hidden = person
    images, _, cams = _views(hidden, w, TRAIN_YAWS[:2])
    lp = build_lpips("alex", None)
    personalize(Photos(images, cams, ["a", "b"]), "bo", PersonalizeConfig(steps=1, anchor_steps=1, sym=False),
                base="tiny-test", generator=_fresh(person), nets=LossNets(lp, lp, None))
    rows = json.loads(_cli(["identities", "--json"]).output)["identities"]
    assert [r["name"] for r in rows] == ["bo"] and rows[0]["photos"] == 2 and rows[0]["parameters"] > 0


def test_cli_personalize_end_to_end(person, tmp_path):
    from PIL import Image

    from my3dgen_cli.generators import save_local_base
    from my3dgen_cli.personalize.reports import to_pil

    _, w, hidden = person
    save_local_base(_fresh(person), "tiny-test")
    images, _, cams = _views(hidden, w, TRAIN_YAWS[:3])
    folder = tmp_path / "photos"
    folder.mkdir()
    labels = []
    for i, (img, cam) in enumerate(zip(images, cams, strict=True)):
        to_pil(img).save(folder / f"view{i}.png")
        labels.append([f"view{i}.png", [float(v) for v in cam]])
    (folder / "dataset.json").write_text(json.dumps({"labels": labels}))
    Image.new("RGB", (8, 8)).save(folder / "junk.jpg")  # not listed in dataset.json: skipped, not fatal
    result = _cli(["personalize", str(folder), "--name", "cli", "--base", "tiny-test", "--steps", "2",
                   "--anchor-steps", "1", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["photos"] == ["view0", "view1", "view2"] and data["parameters"] > 0 and len(data["skipped"]) == 1


@pytest.mark.slow
def test_rank1_adapter_on_ffhq512_is_small(tmp_path):
    """The paper's budget: rank 1 on the default targets of ffhq512-128 is 219,174 parameters, < 1 MB on disk."""
    from my3dgen_cli.adapter_file import save_adapter

    G = build_generator("ffhq512-128")
    add_adapters(G, rank=1, generator=torch.Generator().manual_seed(0))
    n = count_adapter_parameters(G)
    assert n == 219_174 and n <= 250_000
    path = save_adapter(G, tmp_path / "a.safetensors", "eg3d-ffhq512-128", "0" * 64,
                        {"config": PersonalizeConfig().to_dict()})
    assert path.stat().st_size <= 1_000_000


def test_cli_personalize_real_photo_through_faces(person, tmp_path):
    """A real photo (scikit-image's public-domain astronaut) and its mirror: detection, crop, pose, anchors."""
    import skimage.data as skdata
    from PIL import Image

    from my3dgen_cli.eg3d.camera import camera_angles
    from my3dgen_cli.generators import save_local_base
    from my3dgen_cli.identity import identity_paths, read_anchors

    save_local_base(_fresh(person), "tiny-test")
    folder = tmp_path / "photos"
    folder.mkdir()
    photo = Image.fromarray(skdata.astronaut())
    photo.save(folder / "front.png")
    photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / "mirror.png")
    result = _cli(["personalize", str(folder), "--name", "astro", "--base", "tiny-test", "--steps", "1",
                   "--anchor-steps", "1", "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    anchors = read_anchors(identity_paths("astro").anchors)
    ws, cams, names = anchors.ws, anchors.cameras, anchors.photos
    yaw, pitch = camera_angles(cams)
    assert sorted(names) == ["front", "mirror"] and ws.shape[0] == 2
    assert float(yaw[0]) == pytest.approx(-float(yaw[1]), abs=1e-3)
    assert float(pitch[0]) == pytest.approx(float(pitch[1]))


def test_train_config_is_built_from_the_personalize_config():
    import dataclasses

    from my3dgen_cli.personalize.config import TrainConfig

    cfg = PersonalizeConfig(rank=2, include_mapping=True, steps=7, amp="bf16", accum=2, channels_last=False,
                            train_extras=False, sym_every=3)
    train = cfg.train_config()
    assert train.targets == cfg.targets() and (train.rank, train.steps, train.sym_every) == (2, 7, 3)
    assert train.amp == "bf16" and train.accum == 2 and train.channels_last is False and train.train_extras is False
    assert train.resume_fingerprint() == cfg.train_fingerprint()  # checkpoints of earlier runs still resume
    with pytest.raises(dataclasses.FrozenInstanceError):
        train.steps = 3
    own = TrainConfig(targets=cfg.targets(), steps=7, checkpoint_every=5).resume_fingerprint()
    assert own["steps"] == 7 and "checkpoint_every" not in own and "fingerprint" not in own
