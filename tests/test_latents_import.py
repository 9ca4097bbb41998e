"""Latents from other tools: EG3D-projector / My3DGen `.npy` files in render and interpolate, My3DGen dataset
folders in personalize (their latents are the anchors), and one-line errors for every bad input.

Fixtures are written here on the tiny config: a My3DGen-style folder holds image_N.png, image_N_latent.npy
of shape (1, num_ws, w_dim) float32 and an EG3D dataset.json.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from my3dgen_cli import media
from my3dgen_cli.cli import app
from my3dgen_cli.eg3d.camera import lookat_camera
from my3dgen_cli.errors import UserInputError
from my3dgen_cli.identity import Latent, write_latent
from my3dgen_cli.latents import image_stem, open_latent, read_npy
from my3dgen_cli.personalize import anchors
from my3dgen_cli.use.render import latent_from_seed
from tests.personalize_helpers import fresh, make_person, views
from tests.render_fixtures import tiny_base, tiny_generator  # noqa: F401

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread_offline")  # small CPU tests on a shared box, no network


def _w_plus(G, seed: int) -> torch.Tensor:
    """A w+ latent [1, num_ws, w_dim]: a seed's w with a different small offset on every row."""
    ws = latent_from_seed(G, seed)
    return ws + 0.1 * torch.randn(ws.shape, generator=torch.Generator().manual_seed(seed))


def _labels(pairs) -> dict:
    return {"labels": [[name, [float(v) for v in cam.reshape(-1)]] for name, cam in pairs]}


def _one_line_error(result) -> str:
    """exit != 0, exactly one line on stderr, nothing on stdout, no traceback."""
    assert result.exit_code != 0, result.output
    err = result.stderr.strip()
    assert "Traceback" not in result.output and len(err.splitlines()) == 1 and not result.stdout.strip(), result.output
    return err


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im).copy()


# --- reading .npy latents ---------------------------------------------------------------------------


def test_accepted_shapes_dtypes_and_space(tmp_path):
    num_ws, w_dim = 8, 16
    rows = np.random.default_rng(0).standard_normal((num_ws, w_dim)).astype(np.float32)
    w = rows[0]
    cases = {"full": (rows[None], "w+"), "squeezed64": (rows.astype(np.float64), "w+"),
             "one16": (w.astype(np.float16)[None], "w"), "flat": (w, "w"),
             "repeated": (np.tile(w, (1, num_ws, 1)), "w")}
    for name, (array, space) in cases.items():
        np.save(tmp_path / f"{name}.npy", array)
        latent = open_latent(tmp_path / f"{name}.npy", num_ws, w_dim)
        assert latent.ws.shape == (1, num_ws, w_dim) and latent.ws.dtype == torch.float32, name
        assert latent.space == space and latent.camera is None, name
        expected = np.broadcast_to(array.astype(np.float32).reshape(-1, w_dim), (num_ws, w_dim))
        assert np.array_equal(latent.ws[0].numpy(), expected), name
    with pytest.raises(UserInputError, match=r"expected \(1, 9, 16\)"):
        open_latent(tmp_path / "full.npy", 9, w_dim)


def test_image_matching_rule():
    assert image_stem("d/image_3_latent.npy") == "image_3"  # My3DGen
    assert image_stem("X_w.npy") == image_stem("X_w_plus.npy") == "X"  # EG3D-projector / PTI
    assert image_stem("photo_w_latent.npy") == "photo_w"  # only one suffix comes off
    assert image_stem("face.npy") == "face" and image_stem("_w.npy") == "_w"


@pytest.mark.parametrize("kind", ["int", "bool", "complex", "object", "pickle", "npz", "truncated", "text",
                                  "nan", "inf", "overflow", "rank4", "empty", "too_big"])
def test_bad_npy_is_a_user_error_naming_the_file(tmp_path, kind):
    path = tmp_path / f"{kind}.npy"
    good = np.zeros((1, 4, 8), np.float32)
    if kind == "int":
        np.save(path, good.astype(np.int32))
    elif kind == "bool":
        np.save(path, good.astype(bool))
    elif kind == "complex":
        np.save(path, good.astype(np.complex64))
    elif kind == "object":
        np.save(path, np.array([good, None], dtype=object), allow_pickle=True)
    elif kind == "pickle":
        path.write_bytes(pickle.dumps(good))
    elif kind == "npz":
        with path.open("wb") as f:
            np.savez(f, ws=good)
    elif kind == "truncated":
        np.save(path, good)
        path.write_bytes(path.read_bytes()[:-40])
    elif kind == "text":
        path.write_text("not an array")
    elif kind in ("nan", "inf"):
        good[0, 1, 2] = np.nan if kind == "nan" else -np.inf
        np.save(path, good)
    elif kind == "overflow":
        np.save(path, np.full((1, 4, 8), 1e300))  # finite in float64, inf as float32
    elif kind == "rank4":
        np.save(path, good[None])
    elif kind == "empty":
        np.save(path, np.zeros((0,), np.float32))
    elif kind == "too_big":
        np.save(path, np.zeros((1, 4, 300_000), np.float32))  # 4.8 MB, over the 4 MiB cap
    with pytest.raises(UserInputError) as err:
        read_npy(path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message and "expected" in message


# --- render and interpolate ---------------------------------------------------------------------------


@pytest.mark.usefixtures("tiny_base")
def test_render_npy_equals_render_latent(tmp_path):
    G = tiny_generator()
    ws, cam = _w_plus(G, 3), lookat_camera(25.0, -5.0)
    write_latent(tmp_path / "ref.latent", Latent(ws, cam, base="tiny-test"))
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "image_0_latent.npy", ws.numpy().astype(np.float32))
    (data / "dataset.json").write_text(json.dumps(_labels([("image_0.png", cam)])))
    for flags in (["--own-camera"], ["--yaw", "-20", "--pitch", "10"]):
        r1 = runner.invoke(app, ["render", "--latent", str(tmp_path / "ref.latent"), *flags, "-o",
                                 str(tmp_path / "a.png"), "--force"])
        r2 = runner.invoke(app, ["render", "--latent", str(data / "image_0_latent.npy"), *flags, "-o",
                                 str(tmp_path / "b.png"), "--force"])
        assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
        assert np.array_equal(_png(tmp_path / "a.png"), _png(tmp_path / "b.png")), flags
    # the camera really is the dataset.json one: frontal would differ
    r3 = runner.invoke(app, ["render", "--latent", str(data / "image_0_latent.npy"), "-o", str(tmp_path / "c.png")])
    assert r3.exit_code == 0 and not np.array_equal(_png(tmp_path / "b.png"), _png(tmp_path / "c.png"))

    lonely = tmp_path / "lonely_w.npy"  # no dataset.json beside it: no stored camera, --yaw works
    np.save(lonely, latent_from_seed(G, 4)[0, 0].numpy())  # a single w (w_dim,)
    assert "no stored camera" in _one_line_error(runner.invoke(app, ["render", "--latent", str(lonely),
                                                                     "--own-camera", "-o", str(tmp_path / "d")]))
    assert runner.invoke(app, ["render", "--latent", str(lonely), "-o", str(tmp_path / "d")]).exit_code == 0


@pytest.mark.usefixtures("tiny_base")
def test_interpolate_between_two_npy(tmp_path):
    G = tiny_generator()
    wa, wb = _w_plus(G, 1), latent_from_seed(G, 2)
    ca, cb = lookat_camera(-15.0, 0.0), lookat_camera(20.0, 5.0)
    np.save(tmp_path / "anna_w_plus.npy", wa.numpy())
    np.save(tmp_path / "bo_w.npy", wb.numpy())
    (tmp_path / "dataset.json").write_text(json.dumps(_labels([("anna.png", ca), ("bo.png", cb)])))
    out = tmp_path / "morph"
    r = runner.invoke(app, ["interpolate", str(tmp_path / "anna_w_plus.npy"), str(tmp_path / "bo_w.npy"),
                            "--frames", "3", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["keys"] == ["anna_w_plus", "bo_w"]
    with torch.no_grad():
        first = G.synthesis(wa, ca, noise_mode="const", sampling="deterministic")["image"]
        last = G.synthesis(wb, cb, noise_mode="const", sampling="deterministic")["image"]
    for png, ref in ((out / "frame_0000.png", first), (out / "frame_0002.png", last)):
        diff = np.abs(_png(png).astype(int) - media.to_uint8(ref).astype(int))  # batched: one level at most
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01


@pytest.mark.usefixtures("tiny_base")
@pytest.mark.parametrize("kind", ["int", "nan", "shape", "full_size", "dataset_json"])
def test_render_and_interpolate_refuse_bad_npy_in_one_line(tmp_path, kind):
    G = tiny_generator()
    path = tmp_path / "x_latent.npy"
    ws = latent_from_seed(G, 1).numpy()
    np.save(path, {"int": ws.astype(np.int64), "nan": ws * np.nan, "shape": ws[:, :3],
                   "full_size": np.zeros((1, 14, 512), np.float32)}.get(kind, ws))
    if kind == "dataset_json":
        (tmp_path / "dataset.json").write_text('{"labels": [["x.png", [1, 2, 3]]]}')
    for args in (["render", "--latent", str(path)], ["interpolate", str(path), "seed:1"]):
        message = _one_line_error(runner.invoke(app, [*args, "-o", str(tmp_path / "out")]))
        assert str(tmp_path) in message and "expected" in message, message
        assert not (tmp_path / "out").exists()


# --- personalize on a My3DGen dataset folder --------------------------------------------------------


@pytest.fixture(scope="module")
def person():
    return make_person()


class CountingProjector:
    """Wraps anchors.project_to_w and counts the photos it projects."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real, self.photos = anchors.project_to_w, 0
        monkeypatch.setattr(anchors, "project_to_w", self)

    def __call__(self, G, images, *args, **kwargs):
        from my3dgen_cli.personalize.estimate import in_trial

        if not in_trial():  # the estimate's timing steps project nothing of the run
            self.photos += images.shape[0]
        return self.real(G, images, *args, **kwargs)


def _dataset(person, folder: Path, yaws=(-20.0, 0.0, 25.0)) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """A My3DGen-style folder: image_N.png, image_N_latent.npy (1, num_ws, w_dim) float32, dataset.json."""
    from my3dgen_cli.personalize.reports import to_pil

    _, w, hidden = person
    images, _, cams = views(hidden, w, list(yaws))
    folder.mkdir(parents=True, exist_ok=True)
    latents = w.expand(len(yaws), -1, -1) + 0.05 * torch.randn(len(yaws), *w.shape[1:],
                                                               generator=torch.Generator().manual_seed(5))
    for i, img in enumerate(images):
        to_pil(img).save(folder / f"image_{i}.png")
        np.save(folder / f"image_{i}_latent.npy", latents[i:i + 1].numpy().astype(np.float32))
    (folder / "dataset.json").write_text(json.dumps(_labels([(f"image_{i}.png", c) for i, c in enumerate(cams)])))
    return folder, latents, cams


PERSONALIZE = ["--base", "tiny-test", "--steps", "1", "--anchor-steps", "2", "--no-sym", "--device", "cpu"]


@pytest.fixture
def dataset(person, tmp_path):
    from my3dgen_cli.generators import save_local_base

    save_local_base(fresh(person), "tiny-test")
    return _dataset(person, tmp_path / "barack")


def test_personalize_uses_the_dataset_latents_and_reproject_projects(dataset, monkeypatch):
    from my3dgen_cli.identity import identity_paths, read_anchors

    folder, latents, cams = dataset
    counter = CountingProjector(monkeypatch)
    r = runner.invoke(app, ["personalize", str(folder), "--name", "ds", *PERSONALIZE])
    assert r.exit_code == 0, r.output
    said = [line for line in r.stderr.splitlines() if "no projection" in line]
    assert len(said) == 1 and "3 latents" in said[0] and "--reproject" in said[0], r.stderr
    assert counter.photos == 0
    anchors = read_anchors(identity_paths("ds").anchors)
    ws, saved_cams, names = anchors.ws, anchors.cameras, anchors.photos
    stored = torch.cat([torch.from_numpy(np.load(folder / f"image_{i}_latent.npy")) for i in range(3)])
    assert torch.equal(ws, stored) and torch.equal(ws, latents)
    assert torch.equal(saved_cams, cams) and names == ["image_0", "image_1", "image_2"]

    r = runner.invoke(app, ["personalize", str(folder), "--name", "ds", *PERSONALIZE, "--reproject", "--force",
                            "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["anchors"] == "projected" and counter.photos == 3
    anchors = read_anchors(identity_paths("ds").anchors)
    ws, saved_cams = anchors.ws, anchors.cameras
    assert not torch.equal(ws, stored) and torch.equal(saved_cams, cams)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _break(folder: Path, kind: str) -> list[str]:
    """Spoil the dataset one way; returns extra personalize flags."""
    table = json.loads((folder / "dataset.json").read_text())
    labels = table["labels"]
    if kind == "missing_entry":
        del labels[1]
    elif kind == "extra_entry":
        labels.append(["image_9.png", labels[0][1]])
    elif kind == "label_length":
        labels[2][1] = labels[2][1][:24]
    elif kind == "label_nan":
        labels[0][1][3] = float("nan")
    elif kind == "label_text":
        labels[0][1] = "camera"
    elif kind == "twice":
        labels.append(list(labels[0]))
    elif kind == "missing_latent":
        (folder / "image_1_latent.npy").unlink()
    elif kind == "two_latents":
        np.save(folder / "image_1_w.npy", np.load(folder / "image_1_latent.npy"))
    elif kind == "orphan_latent":
        np.save(folder / "image_7_latent.npy", np.load(folder / "image_1_latent.npy"))
    elif kind == "latent_dtype":
        np.save(folder / "image_2_latent.npy", np.load(folder / "image_2_latent.npy").astype(np.int16))
    elif kind == "latent_nan":
        np.save(folder / "image_2_latent.npy", np.load(folder / "image_2_latent.npy") * np.inf)
    elif kind == "latent_size":
        np.save(folder / "image_0_latent.npy", np.zeros((1, 14, 512), np.float32))
    elif kind == "unreadable_image":
        (folder / "image_1.png").write_bytes(b"not a png")
    elif kind == "mirror":
        return ["--mirror"]
    elif kind == "detect":
        return ["--detect"]
    (folder / "dataset.json").write_text(json.dumps(table))
    return []


@pytest.mark.parametrize("kind", ["missing_entry", "extra_entry", "label_length", "label_nan", "label_text", "twice",
                                  "missing_latent", "two_latents", "orphan_latent", "latent_dtype", "latent_nan",
                                  "latent_size", "unreadable_image", "mirror", "detect"])
def test_personalize_refuses_a_dataset_that_does_not_match(dataset, kind, isolated_home, monkeypatch):
    folder = dataset[0]
    identities = isolated_home / "identities"
    for file in ("adapter.safetensors", "anchors.safetensors", "log.json"):  # an identity --force must not touch
        (identities / "old").mkdir(parents=True, exist_ok=True)
        (identities / "old" / file).write_bytes(file.encode())
    before = _tree(identities)
    flags = _break(folder, kind)
    counter = CountingProjector(monkeypatch)
    for name in ("old", "new"):
        message = _one_line_error(runner.invoke(app, ["personalize", str(folder), "--name", name, *PERSONALIZE,
                                                      *flags, "--force"]))
        assert "expected" in message or "--reproject" in message, message
    assert _tree(identities) == before and counter.photos == 0
