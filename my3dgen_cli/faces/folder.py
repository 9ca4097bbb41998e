"""The crop folder `my3dgen faces` writes: <stem>.png crops, contact_sheet.png and dataset.json.

    result = run_faces(FacesPlan(photos=(Path("photos"),), outdir=Path("crops")))

Every file is checked free before the (slow) detection; the user's own files stay unless `force`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from my3dgen_cli.errors import UserInputError
from my3dgen_cli.faces.align import CROP_SIZE
from my3dgen_cli.faces.prepare import FaceSet, expand_inputs, prepare_faces
from my3dgen_cli.output import Output

OUTPUT_NAMES = ("contact_sheet.png", "dataset.json")  # written beside the crops (<stem>.png)


@dataclass(frozen=True)
class FacesPlan:
    """What `my3dgen faces` was asked for: photos (files and folders) in, a crop folder out."""

    photos: tuple[Path, ...]
    outdir: Path
    face_index: int | None = None  # which face per photo: 0 = largest
    labels: Path | None = None  # dataset.json whose cameras replace the pose estimate
    aligned: bool = False  # the photos already are EG3D crops (needs labels)
    min_faces: int = 1
    force: bool = False


def run_faces(plan: FacesPlan, output: Output | None = None) -> tuple[FaceSet, dict[str, Any]]:
    """Detect, crop and write the folder; (the faces, the written paths). Skipped photos are warned about."""
    from my3dgen_cli.fileio import check_free

    if plan.aligned and plan.labels is None:
        raise UserInputError("--aligned needs --labels dataset.json (aligned crops carry no pose)")
    check_outdir(plan.outdir, plan.photos)
    inputs = expand_inputs(plan.photos)
    check_free([plan.outdir / f"{p.stem}.png" for p in inputs] + [plan.outdir / name for name in OUTPUT_NAMES],
               plan.force)
    out = output or Output("quiet")
    with out.progress(transient=True) as bar:
        task = bar.add_task("faces", total=len(inputs), status="")
        result = prepare_faces(plan.photos, min_faces=plan.min_faces, face_index=plan.face_index, labels=plan.labels,
                               aligned=plan.aligned, on_progress=lambda p: bar.update(task, advance=1, status=p.name))
    for skipped in result.skipped:
        out.warn(f"skipped {skipped}")
    return result, write_faces(result, plan.outdir, inputs=plan.photos)


def contact_sheet(faces: FaceSet, tile: int = 256, columns: int = 6) -> Image.Image:
    """A grid of the crops with landmarks and the camera (yaw/pitch) written on each."""
    n = max(len(faces), 1)
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    sheet = Image.new("RGB", (cols * tile, rows * tile), (32, 32, 32))
    font = ImageFont.load_default(size=max(tile // 16, 10))
    for k, face in enumerate(faces):
        img = face.image().resize((tile, tile), Image.Resampling.LANCZOS)
        draw = ImageDraw.Draw(img)
        if face.crop_landmarks is not None:
            for x, y in face.crop_landmarks * (tile / CROP_SIZE):
                draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=(0, 255, 0))
        source = "est" if face.estimated else "json"
        text = f"{face.stem}\nyaw {face.yaw:+.1f}  pitch {face.pitch:+.1f} ({source})"
        draw.multiline_text((5, 5), text, fill=(255, 255, 0), font=font, stroke_width=2, stroke_fill=(0,) * 3)
        sheet.paste(img, ((k % cols) * tile, (k // cols) * tile))
    return sheet


def check_outdir(outdir: str | Path, inputs: Sequence[str | Path]) -> None:
    """Refuse an output folder that is an input folder or holds an input photo."""
    out = Path(outdir).resolve()
    for item in inputs:
        path = Path(item).resolve()
        if out == (path if path.is_dir() else path.parent):
            raise UserInputError(f"output folder {outdir} holds input photos; choose another folder")


def write_faces(faces: FaceSet, outdir: str | Path, inputs: Sequence[str | Path] = ()) -> dict[str, Any]:
    """Write crops (<stem>.png), contact_sheet.png and dataset.json into `outdir`, atomically.

    Refuses an `outdir` that holds any of the photos (inputs are never overwritten).
    Returns the written paths.
    """
    from my3dgen_cli.fileio import write_atomic, write_text_atomic

    out = Path(outdir)
    check_outdir(out, [*inputs, *(f.source for f in faces), *(s.source for s in faces.skipped)])
    crops = []
    for face in faces:
        target = out / face.crop_name
        write_atomic(target, lambda p, f=face: f.image().save(p, format="PNG"))
        crops.append(str(target))
    sheet = out / OUTPUT_NAMES[0]
    write_atomic(sheet, lambda p: contact_sheet(faces).save(p, format="PNG"))
    dataset = out / OUTPUT_NAMES[1]
    write_text_atomic(dataset, json.dumps(faces.dataset_json(), indent=1) + "\n")
    return {"crops": crops, "contact_sheet": str(sheet), "dataset_json": str(dataset)}
