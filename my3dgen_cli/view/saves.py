"""The viewer's buttons: the frame on screen as a PNG, an orbit of it as an MP4, in one folder.

Files are named after what is shown (`Scene.title`); a name already taken gets `-2`, `-3`, ...
unless overwriting was asked for (`--force`), so clicking twice never loses the first file.
Writers are `media`'s (atomic: an interrupted save leaves no half file).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from my3dgen_cli import media
from my3dgen_cli.use.render import orbit_angles
from my3dgen_cli.view.scene import Scene, ViewState


def free_path(folder: Path, stem: str, suffix: str, force: bool) -> Path:
    """folder/stem+suffix, or the first of stem-2, stem-3, ... not taken (any name with `force`)."""
    path = folder / f"{stem}{suffix}"
    k = 2
    while path.exists() and not force:
        path = folder / f"{stem}-{k}{suffix}"
        k += 1
    return path


class Saver:
    """Writes what the page shows into `folder` (created on the first save)."""

    def __init__(self, scene: Scene, folder: Path, force: bool = False, orbit_frames: int = 48,
                 fps: float = 24.0) -> None:
        self.scene, self.folder, self.force = scene, folder, force
        self.orbit_frames, self.fps = orbit_frames, fps

    def png(self, state: ViewState) -> Path:
        """The full frame of `state` (or its depth preview) as a PNG."""
        path = free_path(self.folder, self.scene.title(state), ".png", self.force)
        return media.write_png(path, self.scene.frame(state, "full"))

    def orbit(self, state: ViewState) -> Path:
        """An orbit around the frontal view (`my3dgen render --orbit`'s loop) of the shown latent, as an MP4."""
        stem = self.scene.title(replace(state, mode="rgb"), angles=False)
        path = free_path(self.folder, f"{stem}_orbit", ".mp4", self.force)
        frames = self.scene.orbit(state, orbit_angles(self.orbit_frames))
        return media.write_mp4(path, frames, self.fps)
