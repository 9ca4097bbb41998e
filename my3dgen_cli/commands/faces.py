"""`my3dgen faces PHOTOS... -o OUTDIR`: aligned 512 px crops, a contact sheet and dataset.json."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from my3dgen_cli.cli import command, output_for
from my3dgen_cli.commands.options import MAX_INDICES, check_free, check_range

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
    json_mode: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print results only.")] = False,
) -> None:
    """Find the face in each photo, cut EG3D's 512 px crop and estimate its camera."""
    from my3dgen_cli.errors import UserInputError
    from my3dgen_cli.faces.prepare import OUTPUT_NAMES, check_outdir, expand_inputs, prepare_faces, write_faces

    out = output_for(json_mode, quiet)
    if aligned and labels is None:
        raise UserInputError("--aligned needs --labels dataset.json (aligned crops carry no pose)")
    check_range("--face-index", face_index, 0, MAX_FACE_INDEX)
    check_range("--min-faces", min_faces, 0, MAX_INDICES)
    check_outdir(outdir, photos)
    inputs = expand_inputs(photos)
    # Every file this run may write, checked before the (slow) detection: the user's own files stay.
    check_free([outdir / f"{p.stem}.png" for p in inputs] + [outdir / OUTPUT_NAMES[0], outdir / OUTPUT_NAMES[1]],
               force)
    total = len(inputs)
    with out.progress(transient=True) as bar:
        task = bar.add_task("faces", total=total, status="")
        result = prepare_faces(
            photos,
            min_faces=min_faces,
            face_index=face_index,
            labels=labels,
            aligned=aligned,
            on_progress=lambda p: bar.update(task, advance=1, status=p.name),
        )
    for skipped in result.skipped:
        out.warn(f"skipped {skipped}")
    written = write_faces(result, outdir, inputs=photos)
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
