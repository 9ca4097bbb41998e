"""Writers for what render/invert/interpolate produce: PNG (8- and 16-bit), GIF, MP4, meshes, grids.

Every writer goes through `fileio.atomic_path`, so an interrupted run never leaves half a file.
Images are handled as uint8 arrays [H, W, 3] (RGB); tensors in EG3D's [-1, 1] range are converted
with `to_uint8`. MP4 uses imageio-ffmpeg (its ffmpeg binary ships inside the wheel), H.264 yuv420p,
frames padded to even sizes; GIF uses Pillow. PLY is written here (binary little-endian or ASCII, with
optional vertex colours) and read back by `read_ply` (used by the tests and handy for scripts); .obj
and .glb go through trimesh, the optional `mesh` extra, imported only when asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from my3dgen_cli.errors import UserInputError
from my3dgen_cli.fileio import atomic_path


def to_uint8(image) -> np.ndarray:
    """[3, H, W] or [1, 3, H, W] tensor in [-1, 1] -> [H, W, 3] uint8 (clipped, rounded)."""
    import torch

    x = image.detach().float().cpu()
    if x.ndim == 4:
        if x.shape[0] != 1:
            raise ValueError(f"to_uint8: got shape {list(x.shape)}, expected [3, H, W] or [1, 3, H, W]")
        x = x[0]
    x = ((x.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255)
    return x.to(torch.uint8).numpy()


def write_png(path: str | Path, image: np.ndarray, text: dict[str, str] | None = None) -> Path:
    """uint8 [H, W, 3] (or [H, W]) or uint16 [H, W] array -> PNG. `text`: tEXt chunks."""
    info = None
    if text:
        info = PngImagePlugin.PngInfo()
        for k, v in text.items():
            info.add_text(k, v)
    if image.dtype == np.uint16:
        if image.ndim != 2:
            raise ValueError(f"16-bit PNG: got shape {image.shape}, expected [H, W]")
        pil = Image.fromarray(np.ascontiguousarray(image, dtype="<u2"))  # mode I;16
    elif image.dtype == np.uint8:
        pil = Image.fromarray(image)
    else:
        raise ValueError(f"PNG: got dtype {image.dtype}, expected uint8 or uint16")
    with atomic_path(path) as tmp:
        pil.save(tmp, format="PNG", pnginfo=info)
    return Path(path)


def depth_to_uint16(depth: np.ndarray, near: float, far: float) -> np.ndarray:
    """Depth [H, W] in scene units -> uint16 with near = 0 and far = 65535 (linear)."""
    scaled = (np.asarray(depth, dtype=np.float64) - near) / (far - near)
    return np.round(np.clip(scaled, 0, 1) * 65535).astype(np.uint16)


# A perceptually ordered ramp (dark blue -> teal -> yellow), sampled at 5 stops and interpolated.
_RAMP = np.array([[48, 18, 59], [40, 110, 210], [30, 190, 160], [200, 220, 60], [250, 250, 200]], dtype=np.float64)


def colorize_depth(depth: np.ndarray) -> np.ndarray:
    """Depth [H, W] -> uint8 [H, W, 3] preview: near is bright, far is dark, scaled to its own range."""
    d = np.asarray(depth, dtype=np.float64)
    lo, hi = float(d.min()), float(d.max())
    t = 1 - (d - lo) / (hi - lo) if hi > lo else np.zeros_like(d)
    pos = t * (len(_RAMP) - 1)
    i = np.clip(np.floor(pos).astype(int), 0, len(_RAMP) - 2)
    frac = (pos - i)[..., None]
    rgb = _RAMP[i] * (1 - frac) + _RAMP[i + 1] * frac
    return np.round(rgb).astype(np.uint8)


def grid(images: Sequence[np.ndarray], columns: int | None = None, pad: int = 2, fill: int = 255) -> np.ndarray:
    """Tile equally sized uint8 [H, W, 3] images row-major into one sheet (contact sheet / strip)."""
    if not images:
        raise ValueError("grid: got no images, expected at least one")
    h, w = images[0].shape[:2]
    for im in images:
        if im.shape[:2] != (h, w):
            raise ValueError(f"grid: got an image of {im.shape[:2]}, expected {(h, w)} like the first")
    cols = columns or len(images)
    rows = -(-len(images) // cols)
    sheet = np.full((rows * h + (rows + 1) * pad, cols * w + (cols + 1) * pad, 3), fill, dtype=np.uint8)
    for k, im in enumerate(images):
        r, c = divmod(k, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        sheet[y:y + h, x:x + w] = im[..., :3] if im.ndim == 3 else im[..., None]
    return sheet


def write_gif(path: str | Path, frames: Sequence[np.ndarray], fps: float = 24.0) -> Path:
    """uint8 [H, W, 3] frames -> looping GIF (Pillow, adaptive palette per frame)."""
    if not frames:
        raise ValueError("GIF: got no frames")
    pil = [Image.fromarray(f) for f in frames]
    with atomic_path(path) as tmp:
        pil[0].save(tmp, format="GIF", save_all=True, append_images=pil[1:], duration=round(1000 / fps), loop=0,
                    disposal=2)
    return Path(path)


def _even(frame: np.ndarray) -> np.ndarray:
    h, w = frame.shape[:2]
    return np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def write_mp4(path: str | Path, frames: Sequence[np.ndarray], fps: float = 24.0, quality: float = 8) -> Path:
    """uint8 [H, W, 3] frames -> H.264 MP4 (yuv420p, so players everywhere open it)."""
    if not frames:
        raise ValueError("MP4: got no frames")
    try:
        import imageio_ffmpeg
    except ImportError as err:  # pragma: no cover - a dependency; message for broken installs
        raise UserInputError(f"MP4 needs imageio-ffmpeg ({err}); install it or use the GIF") from None
    first = _even(frames[0])
    h, w = first.shape[:2]
    with atomic_path(path) as tmp:
        # The temp name ends in .tmp, so the container is named explicitly ("-f mp4").
        writer = imageio_ffmpeg.write_frames(str(tmp), (w, h), fps=fps, codec="libx264", quality=quality,
                                             pix_fmt_out="yuv420p", macro_block_size=1, ffmpeg_log_level="error",
                                             output_params=["-f", "mp4"])
        writer.send(None)
        try:
            for f in frames:
                writer.send(np.ascontiguousarray(_even(f)))
        finally:
            writer.close()
    return Path(path)


def count_video_frames(path: str | Path) -> int:
    """Decode a video with imageio-ffmpeg and count its frames (used by tests and checks)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    next(reader)  # metadata
    return sum(1 for _ in reader)


MESH_SUFFIXES = (".ply", ".obj", ".glb")
MESH_EXTRA = "pip install 'my3dgen[mesh]'"


def check_mesh_suffix(path: str | Path) -> str:
    """The mesh format of `path` (".ply", ".obj" or ".glb"); .obj/.glb need trimesh (the `mesh` extra).

    Called before any work is done, so a missing extra costs one line, not a finished render.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in MESH_SUFFIXES:
        raise UserInputError(f"mesh: got {path}, expected a {', '.join(MESH_SUFFIXES)} file")
    if suffix != ".ply":
        try:
            import trimesh  # noqa: F401
        except ImportError:
            raise UserInputError(f"{suffix} meshes need trimesh: {MESH_EXTRA} (.ply works without it)") from None
    return suffix


def write_mesh(path: str | Path, mesh, binary: bool = True, comment: str = "my3dgen mesh") -> Path:
    """A `mesh.Mesh` -> .ply (written here), or .obj / .glb (through trimesh), chosen by the suffix."""
    suffix = check_mesh_suffix(path)
    if suffix == ".ply":
        return write_ply(path, mesh.vertices, mesh.faces, binary=binary, comment=comment, colors=mesh.colors)
    import trimesh

    colors = None if mesh.colors is None else np.concatenate(
        [mesh.colors, np.full((len(mesh.colors), 1), 255, dtype=np.uint8)], axis=1)
    shape = trimesh.Trimesh(vertices=mesh.vertices, faces=mesh.faces, vertex_colors=colors, process=False)
    data = shape.export(file_type=suffix[1:])
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def write_ply(path: str | Path, vertices: np.ndarray, faces: np.ndarray, binary: bool = True,
              comment: str = "my3dgen mesh", colors: np.ndarray | None = None) -> Path:
    """Triangle mesh -> PLY. vertices: float [V, 3]; faces: int [F, 3] (0-based); colors: uint8 [V, 3] or None."""
    v = np.ascontiguousarray(vertices, dtype="<f4")
    f = np.ascontiguousarray(faces, dtype="<i4")
    if v.ndim != 2 or v.shape[1] != 3 or f.ndim != 2 or f.shape[1] != 3:
        raise ValueError(f"PLY: got vertices {v.shape} and faces {f.shape}, expected [V, 3] and [F, 3]")
    if colors is not None and np.shape(colors) != v.shape:
        raise ValueError(f"PLY: got colours {np.shape(colors)}, expected {v.shape} like the vertices")
    fields = [("xyz", "<f4", (3,))] + ([("rgb", "u1", (3,))] if colors is not None else [])
    rows = np.zeros(len(v), dtype=fields)
    rows["xyz"] = v
    if colors is not None:
        rows["rgb"] = np.asarray(colors, dtype=np.uint8)
    header = (
        "ply\n"
        f"format {'binary_little_endian' if binary else 'ascii'} 1.0\n"
        f"comment {comment}\n"
        f"element vertex {len(v)}\n"
        "property float x\nproperty float y\nproperty float z\n"
        + ("property uchar red\nproperty uchar green\nproperty uchar blue\n" if colors is not None else "")
        + f"element face {len(f)}\n"
        "property list uchar int vertex_indices\n"
        "end_header\n"
    ).encode("ascii")
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        out.write(header)
        if binary:
            out.write(rows.tobytes())
            face_rows = np.zeros(len(f), dtype=[("n", "u1"), ("idx", "<i4", (3,))])
            face_rows["n"] = 3
            face_rows["idx"] = f
            out.write(face_rows.tobytes())
        else:
            for row in rows:
                xyz = " ".join(f"{x:.6g}" for x in row["xyz"])
                rgb = "".join(f" {c}" for c in row["rgb"]) if colors is not None else ""
                out.write(f"{xyz}{rgb}\n".encode("ascii"))
            for a, b, c in f:
                out.write(f"3 {a} {b} {c}\n".encode("ascii"))
    return Path(path)


def read_ply(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a triangle PLY as written by `write_ply` (binary little-endian or ASCII) -> (V [V,3], F [F,3])."""
    data = Path(path).read_bytes()
    end = data.find(b"end_header\n")
    if not data.startswith(b"ply\n") or end < 0:
        raise ValueError(f"{path}: not a PLY file")
    header = data[:end].decode("ascii").splitlines()
    fmt = next(line.split()[1] for line in header if line.startswith("format"))
    counts = {line.split()[1]: int(line.split()[2]) for line in header if line.startswith("element")}
    nv, nf = counts.get("vertex", 0), counts.get("face", 0)
    colored = "property uchar red" in header
    body = data[end + len(b"end_header\n"):]
    if fmt == "binary_little_endian":
        vertex = [("xyz", "<f4", (3,))] + ([("rgb", "u1", (3,))] if colored else [])
        verts = np.frombuffer(body, dtype=vertex, count=nv)["xyz"]
        rows = np.frombuffer(body, dtype=[("n", "u1"), ("idx", "<i4", (3,))], count=nf,
                             offset=nv * np.dtype(vertex).itemsize)
        if nf and not (rows["n"] == 3).all():
            raise ValueError(f"{path}: only triangle faces are supported")
        return verts.copy(), rows["idx"].copy()
    if fmt == "ascii":
        lines = body.decode("ascii").split("\n")
        verts = np.array([[float(t) for t in lines[i].split()[:3]] for i in range(nv)], dtype=np.float32)
        faces = np.array([[int(t) for t in lines[nv + i].split()[1:4]] for i in range(nf)], dtype=np.int64)
        return verts.reshape(nv, 3), faces.reshape(nf, 3)
    raise ValueError(f"{path}: got PLY format {fmt!r}, expected binary_little_endian or ascii")
