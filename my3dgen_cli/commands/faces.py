"""`my3dgen faces PHOTOS... -o OUTDIR`: aligned 512 px crops, a contact sheet and dataset.json."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from my3dgen_cli.cli import command, output_for
from my3dgen_cli.commands.options import MAX_INDICES, JsonOpt, QuietOpt, check_range

MAX_FACE_INDEX = 1000


@command("faces")
def faces(
    photos: Annotated[list[Path], typer.Argument(help="Photo files and/or folders of photos.")],
    outdir: Annotated[
        Path, typer.Option("--output", "-o", help="Folder for crops, contact sheet, dataset.json.")
    ],
    face_index: Annotated[
        int | None, typer.Option("--face-index", help="Which face per photo: 0 = largest (default).")
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option("--labels", help="EG3D dataset.json whose cameras replace the pose estimate."),
    ] = None,
    aligned: Annotated[
        bool, typer.Option("--aligned", help="Photos already are EG3D crops (needs --labels).")
    ] = False,
    min_faces: Annotated[
        int, typer.Option("--min-faces", help="Fail below this many usable photos.")
    ] = 1,
    force: Annotated[bool, typer.Option("--force", help="Overwrite crops, contact_sheet.png and dataset.json "
                                        "already in the output folder.")] = False,
    json_mode: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Find the face in each photo, cut EG3D's 512 px crop and estimate its camera."""
    from my3dgen_cli.faces.folder import FacesPlan, run_faces

    out = output_for(json_mode, quiet)
    check_range("--face-index", face_index, 0, MAX_FACE_INDEX)
    check_range("--min-faces", min_faces, 0, MAX_INDICES)
    plan = FacesPlan(tuple(photos), outdir, face_index=face_index, labels=labels, aligned=aligned,
                     min_faces=min_faces, force=force)
    result, written = run_faces(plan, out)
    summary = {
        "faces": [
            {
                "source": str(f.source),
                "crop": str(Path(outdir) / f.crop_name),
                "yaw": round(f.yaw, 3),
                "pitch": round(f.pitch, 3),
                "camera": "estimated" if f.estimated else "dataset.json",
                "score": None if f.score is None else round(f.score, 4),
            }
            for f in result
        ],
        "skipped": [{"source": str(s.source), "reason": s.reason} for s in result.skipped],
        "contact_sheet": written["contact_sheet"],
        "dataset_json": written["dataset_json"],
    }
    lines = [f"{f.crop_name}: yaw {f.yaw:+.1f} pitch {f.pitch:+.1f}" for f in result]
    lines.append(
        f"{len(result)} face(s) -> {outdir} (dataset.json, contact_sheet.png); {len(result.skipped)} skipped"
    )
    out.result(summary, human="\n".join(lines))
