"""The examples that end each command's `--help`, in one table keyed by the command's path.

cli.py applies them when the commands are registered (as the help's epilog), so a command file does
not carry them; tests/test_cli_shell.py checks that every command has one.
"""

from __future__ import annotations

EXAMPLES: dict[str, tuple[str, ...]] = {
    "fetch": ("my3dgen fetch --list", "my3dgen fetch eg3d-ffhq512-128"),
    "faces": ("my3dgen faces photos/ -o crops/",),
    "personalize": ("my3dgen personalize photos/ --name ana", "my3dgen personalize --batch-file people.csv"),
    "identities": ("my3dgen identities", "my3dgen identities export ana -o ana.zip"),
    "identities list": ("my3dgen identities list --json",),
    "identities rm": ("my3dgen identities rm ana",),
    "identities export": ("my3dgen identities export ana -o ana.zip",),
    "identities import": ("my3dgen identities import ana.zip --name ana2",
                          "my3dgen identities import network-snapshot-000400.pkl --name bo"),
    "invert": ("my3dgen invert photo.jpg --identity ana -o photo.latent",
               "my3dgen invert crop.png --yaw 20 --identity ana --tune 100"),
    "render": ("my3dgen render --identity ana --anchor 0 --yaw -30:30:7 -o renders/",
               "my3dgen render --seed 7 --orbit 48 --mesh face.ply"),
    "interpolate": ("my3dgen interpolate anchor:0 anchor:3 --identity ana -o morph.mp4",),
    "view": ("my3dgen view --identity ana",),
    "export": ("my3dgen export --identity ana -o ana.onnx", "my3dgen export --identity ana -o ana.safetensors"),
    "demo": ("my3dgen demo", "my3dgen demo --fast -o demo-report/"),
    "eval": ("my3dgen eval heldout/ --identity ana",),
    "cache": ("my3dgen cache ls", "my3dgen cache prune --dry-run"),
    "cache ls": ("my3dgen cache ls --json",),
    "cache verify": ("my3dgen cache verify",),
    "cache rm": ("my3dgen cache rm eg3d-ffhq512-128",),
    "cache prune": ("my3dgen cache prune --dry-run",),
}


def epilog(path: str) -> str | None:
    """The `--help` ending of the command at `path` ("render", "cache ls"); None when the table has none.

    Click rewraps help paragraphs unless the paragraph starts with a `\\b` line, which keeps each example
    on its own line.
    """
    lines = EXAMPLES.get(path)
    if not lines:
        return None
    return "\n".join(["Examples:", "", "\b", *(f"  {line}" for line in lines)])
