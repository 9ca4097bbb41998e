"""Photos in: detection, EG3D crop, pose, mirror symmetry, bad input, dataset.json, CLI.

Real photos from scikit-image (public domain astronaut, coffee); everything offline.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import skimage.data as skimage_data
import torch
from PIL import Image
from typer.testing import CliRunner

from my3dgen_cli.cli import app  # noqa: E402
from my3dgen_cli.eg3d.camera import lookat_camera  # noqa: E402
from my3dgen_cli.errors import ChecksumError, UserInputError  # noqa: E402
from my3dgen_cli.faces.detect import default_detector  # noqa: E402
from my3dgen_cli.faces.prepare import prepare_face, prepare_faces, read_dataset_json  # noqa: E402


def eye_angle(landmarks: np.ndarray) -> float:
    """Angle of the eye line in degrees (0 = level)."""
    d = landmarks[1] - landmarks[0]
    return math.degrees(math.atan2(d[1], d[0]))


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage_data.astronaut()


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory, astronaut: np.ndarray) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(astronaut).save(folder / "astronaut.png")
    Image.fromarray(np.ascontiguousarray(astronaut[:, ::-1])).save(folder / "flipped.png")
    Image.fromarray(skimage_data.coffee()).save(folder / "coffee.jpg")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (folder / "notes.txt").write_text("not a photo, not picked up from a folder")
    return folder


@pytest.fixture(scope="module")
def faceset(photos: Path):  # type: ignore[no-untyped-def]
    return prepare_faces([photos])


def test_detector_finds_the_astronaut(astronaut: np.ndarray) -> None:
    dets = default_detector().detect(astronaut)
    assert dets and dets[0].score > 0.99
    left_eye, right_eye, nose = dets[0].landmarks[:3]
    assert 190 < left_eye[0] < 215 and 235 < right_eye[0] < 260  # eyes at x ~ 204 and ~ 247
    assert 90 < left_eye[1] < 112 and left_eye[1] < nose[1]


def test_weights_are_verified(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from my3dgen_cli.faces import detect as faces_detect

    registry = tmp_path / "lab.toml"
    registry.write_text(f'name = "mtcnn-pnet"\nsha256 = "{"0" * 64}"\n')
    monkeypatch.setenv("MY3DGEN_REGISTRY", str(registry))
    with pytest.raises(ChecksumError):
        faces_detect.load_weights("pnet")


def test_astronaut_crop_and_pose(faceset) -> None:  # type: ignore[no-untyped-def]
    face = next(f for f in faceset if f.stem == "astronaut")
    assert face.crop.shape == (512, 512, 3) and face.crop.dtype == np.uint8
    assert abs(face.yaw) < 20.0
    assert abs(face.pitch) < 25.0
    assert abs(eye_angle(face.crop_landmarks)) < 1e-6
    assert face.camera.shape == (25,)
    np.testing.assert_allclose(face.camera, lookat_camera(face.yaw, face.pitch)[0].numpy(), atol=1e-6)


def test_mirrored_photo_gives_mirrored_crop_and_camera(faceset) -> None:  # type: ignore[no-untyped-def]
    face = next(f for f in faceset if f.stem == "astronaut")
    flip = next(f for f in faceset if f.stem == "flipped")
    assert abs(flip.yaw + face.yaw) < 1e-6  # by construction; the brief asks for 3 degrees
    assert abs(flip.pitch - face.pitch) < 1e-6
    diff = np.abs(flip.crop.astype(int) - face.crop[:, ::-1].astype(int))
    assert diff.max() <= 1, diff.max()
    from my3dgen_cli.eg3d.camera import mirror_camera

    mirrored = mirror_camera(torch.from_numpy(face.camera)[None])[0].numpy()
    np.testing.assert_allclose(flip.camera, mirrored, atol=1e-5)


def test_rotated_face_is_aligned_upright(tmp_path: Path, astronaut: np.ndarray) -> None:
    rotated = Image.fromarray(astronaut).rotate(20, resample=Image.Resampling.BICUBIC, expand=True)
    rotated.save(tmp_path / "rotated.png")
    face = prepare_face(tmp_path / "rotated.png")
    redetected = default_detector().detect(face.crop)[0].landmarks
    assert abs(eye_angle(redetected)) < 2.0


def test_bad_files_are_reported_and_skipped(faceset, photos: Path) -> None:  # type: ignore[no-untyped-def]
    assert sorted(f.stem for f in faceset) == ["astronaut", "flipped"]
    reasons = {s.source.name: s.reason for s in faceset.skipped}
    assert set(reasons) == {"coffee.jpg", "corrupt.jpg"}  # notes.txt is not an image suffix
    assert reasons["coffee.jpg"] == "no face found"
    assert "not an image" in reasons["corrupt.jpg"] or "unreadable" in reasons["corrupt.jpg"]


def test_too_few_faces_is_a_user_error(photos: Path) -> None:
    expected = r"got 0 usable photo\(s\) of 2, expected at least 1.*no face found"
    with pytest.raises(UserInputError, match=expected):
        prepare_faces([photos / "coffee.jpg", photos / "corrupt.jpg"])


def test_tiny_face_is_too_small(tmp_path: Path, astronaut: np.ndarray) -> None:
    Image.fromarray(astronaut).resize((160, 160), Image.Resampling.LANCZOS).save(tmp_path / "tiny.png")
    faces = prepare_faces([tmp_path / "tiny.png"], min_faces=0)
    assert len(faces) == 0
    assert faces.skipped[0].reason.startswith("face too small")


def test_exif_orientation_grey_and_rgba(tmp_path: Path, astronaut: np.ndarray) -> None:
    # Stored turned on its side with EXIF "rotate 90 CW to view" (orientation 6): must be undone.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(astronaut).rotate(90, expand=True).save(tmp_path / "exif.jpg", exif=exif, quality=95)
    Image.fromarray(astronaut).convert("L").save(tmp_path / "grey.png")
    Image.fromarray(astronaut).convert("RGBA").save(tmp_path / "rgba.webp", lossless=True)
    faces = prepare_faces([tmp_path])
    assert sorted(f.stem for f in faces) == ["exif", "grey", "rgba"]
    for face in faces:
        assert abs(eye_angle(face.crop_landmarks)) < 1e-6 and abs(face.yaw) < 20


def test_dataset_json_round_trip(tmp_path: Path, faceset, photos: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(faceset.dataset_json()))
    table = read_dataset_json(path)
    assert set(table) == {"astronaut.png", "flipped.png"}
    # Frontal cameras given for the photos replace the estimate exactly.
    frontal = lookat_camera(0.0, 0.0)[0].tolist()
    path.write_text(json.dumps({"labels": [["astronaut.png", frontal]]}))
    faces = prepare_faces([photos / "astronaut.png"], labels=path)
    np.testing.assert_allclose(faces[0].camera, np.asarray(frontal), atol=1e-4)
    assert not faces[0].estimated and abs(faces[0].yaw) < 1e-3 and abs(faces[0].pitch) < 1e-3
    # A photo the file does not list is skipped, with the reason.
    faces = prepare_faces([photos / "flipped.png"], labels=path, min_faces=0)
    assert faces.skipped[0].reason == "not listed in dataset.json"


def test_cli_writes_crops_sheet_and_dataset(tmp_path: Path, photos: Path) -> None:
    out = tmp_path / "out"
    before = sorted((p.name, p.stat().st_mtime_ns) for p in photos.iterdir())
    result = CliRunner().invoke(app, ["faces", str(photos / "astronaut.png"), str(photos / "coffee.jpg"),
                                      "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert [Path(f["crop"]).name for f in summary["faces"]] == ["astronaut.png"]
    assert summary["skipped"][0]["reason"] == "no face found"
    assert Image.open(out / "astronaut.png").size == (512, 512)
    assert Image.open(out / "contact_sheet.png").size[0] > 0
    labels = json.loads((out / "dataset.json").read_text())["labels"]
    assert labels[0][0] == "astronaut.png" and len(labels[0][1]) == 25
    assert sorted((p.name, p.stat().st_mtime_ns) for p in photos.iterdir()) == before


def test_cli_refuses_input_folder_as_output_and_too_few(photos: Path) -> None:
    result = CliRunner().invoke(app, ["faces", str(photos / "astronaut.png"), "-o", str(photos)])
    assert result.exit_code == 2 and "holds input photos" in result.output
    result = CliRunner().invoke(app, ["faces", str(photos / "coffee.jpg"), "-o", str(photos / "x")])
    assert result.exit_code == 2 and "expected at least 1" in result.output
    assert not (photos / "x").exists()


def test_huge_photo_is_shrunk_for_detection_only(  # type: ignore[no-untyped-def]
    tmp_path: Path, astronaut: np.ndarray, faceset
) -> None:
    Image.fromarray(astronaut).resize((2048, 2048), Image.Resampling.BICUBIC).save(tmp_path / "huge.png")
    face = prepare_face(tmp_path / "huge.png")
    small = next(f for f in faceset if f.stem == "astronaut")
    assert abs(face.yaw - small.yaw) < 3.0
    assert np.abs(face.crop.astype(float) - small.crop).mean() < 12.0  # same framing, sharper source


def test_bad_dataset_json_is_a_user_error(tmp_path: Path) -> None:
    bad = tmp_path / "dataset.json"
    bad.write_text('{"labels": [["a.png", [1, 2, 3]]]}')
    with pytest.raises(UserInputError, match="got 3 values, expected 25"):
        read_dataset_json(bad)
    bad.write_text("{not json")
    with pytest.raises(UserInputError, match="cannot read dataset.json"):
        read_dataset_json(bad)
    bad.write_text('{"labels":' + "[" * 100000 + "]" * 100000 + "}")  # json's recursion limit
    with pytest.raises(UserInputError, match="cannot read dataset.json"):
        read_dataset_json(bad)
