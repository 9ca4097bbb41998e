"""Print how far our generator is from the official EG3D outputs in shared/eg3d_parity.

    python bench/parity_report.py [--fixture ../shared/eg3d_parity]

Loads the fixture's weights strictly, runs each case with deterministic sampling and
noise_mode "const", and prints the max abs difference of ws, image, raw rgb and depth.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from my3dgen_cli.eg3d import build_generator

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "eg3d_parity"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixture", type=Path, default=DEFAULT)
    args = parser.parse_args()
    G = build_generator(json.loads((args.fixture / "config.json").read_text()))
    G.load_state_dict({k: v.float() for k, v in load_file(args.fixture / "weights.safetensors").items()}, strict=True)
    print(f"{'case':>4} {'nrr':>4} {'psi':>4} {'ws':>9} {'image':>9} {'raw rgb':>9} {'depth':>9}")
    for path in sorted(args.fixture.glob("case*.safetensors")):
        data = load_file(path)
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        with torch.no_grad():
            ws = G.mapping(data["z"], data["c_cond"], truncation_psi=float(meta["psi"]),
                           truncation_cutoff=int(meta["truncation_cutoff"]))
            out = G.synthesis(ws, data["c_render"], neural_rendering_resolution=int(meta["nrr"]), noise_mode="const")
        diffs = [(ws - data["ws"]).abs().max(), (out["image"] - data["image"]).abs().max(),
                 (out["image_raw"] - data["image_raw_rgb"]).abs().max(),
                 (out["image_depth"] - data["image_depth"]).abs().max()]
        print(f"{path.stem[4:]:>4} {meta['nrr']:>4} {meta['psi']:>4} " + " ".join(f"{d.item():9.2e}" for d in diffs))


if __name__ == "__main__":
    main()
