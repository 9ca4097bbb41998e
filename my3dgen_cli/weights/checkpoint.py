"""EG3D checkpoints in, generators out: converting official files and loading any base file.

- `convert_pkl`: an official `.pkl` (read safely, `official_pkl.py`) -> a converted base (`converted.py`),
  after every tensor name and shape and the config fit (`fit.py`);
- `convert_safetensors`: a base published as a plain `.safetensors` (official names, no config) -> a
  converted base, with the named config its zoo entry gives;
- `load_generator`: a generator from either a converted base or an official `.pkl`.
See docs/checkpoints.md and docs/formats.md.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from my3dgen_cli.errors import UserInputError
from my3dgen_cli.weights.converted import ConvertedBase, all_finite, read_converted_base, write_converted_base
from my3dgen_cli.weights.fit import check_config, check_state_dict, expected_shapes, generator_of
from my3dgen_cli.weights.instantiate import assign_state
from my3dgen_cli.weights.official_pkl import read_official_pkl


def load_generator(path: str | Path, device: torch.device | str | None = None) -> torch.nn.Module:
    """A generator in eval mode with the weights of `path` loaded strictly.

    path: a converted `.safetensors` (its `.json` beside it) or an official `.pkl` (read with the
    safe reader, `G_ema`; nothing is written). Weights are cast to the generator's dtype (fp16
    storage loads into fp32 parameters). device: where to move the generator (None: CPU).
    The generator is built without random initialisation and takes the file's tensors as its own
    (`instantiate.py`); fp32 weights of a converted file stay memory-mapped (read on first use).
    """
    path = Path(path)
    if path.suffix == ".pkl":
        ckpt = read_official_pkl(path)
        state_dict, config = ckpt.state_dict, ckpt.config(source={"file": path.name, "network": "G_ema"})
    else:
        base = read_converted_base(path)
        state_dict, config = base.state_dict, base.config
    try:
        generator = generator_of(config)
        check_state_dict(state_dict, {name: tuple(t.shape) for name, t in generator.state_dict().items()})
    except UserInputError as err:
        raise UserInputError(f"{path}: {err}") from None
    generator = assign_state(generator, state_dict)
    if device is not None:
        generator = generator.to(device)
    return generator.eval()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def convert_pkl(
    src: str | Path, dst: str | Path, *, config: str | None = None, source_name: str | None = None
) -> Path:
    """Official `.pkl` -> converted `dst` (.safetensors + .json), after checking every name and shape
    against `build_generator(config)`. Tensors keep their dtype (fp32 for released models).

    config: the named config the file must hold (a zoo entry's `config`); another one raises
    `ConfigMismatchError` before anything is written. None: take the file's own config as it is.
    source_name: the file name to record in the JSON (default: `src`'s; the zoo passes the
    artifact's usual name, since it converts a download under a temporary name).
    """
    src, dst = Path(src), Path(dst)
    ckpt = read_official_pkl(src)
    found = ckpt.config(source={"file": source_name or src.name, "sha256": sha256_file(src), "network": "G_ema"})
    if config is not None:
        check_config(found, config, src)
    return _save_checked(ckpt.state_dict, found, src, dst)


def convert_safetensors(src: str | Path, dst: str | Path, config: str) -> Path:
    """A plain `.safetensors` of official-named tensors (a base published without a pickle) ->
    converted `dst`, with the named EG3D `config` (the zoo entry's `config` field: a safetensors
    file carries no init or rendering kwargs). Header metadata of `src` is ignored; dtypes kept."""
    from safetensors import safe_open

    from my3dgen_cli.eg3d.configs import resolve_config

    src, dst = Path(src), Path(dst)
    try:
        doc = resolve_config(config).to_dict()
    except ValueError as err:
        raise UserInputError(f"{src}: {err}") from None
    try:
        with safe_open(str(src), framework="pt", device="cpu") as f:
            state_dict = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # safetensors raises its own SafetensorError for any malformed file
        raise UserInputError(f"{src}: not a readable safetensors file ({type(err).__name__})") from None
    doc["source"] = {"file": src.name, "sha256": sha256_file(src), "format": "safetensors", "config": config}
    return _save_checked(state_dict, doc, src, dst)


def _save_checked(state_dict: dict[str, torch.Tensor], config: dict[str, Any], src: Path, dst: Path) -> Path:
    """write_converted_base after every name and shape fits `config` and every float is finite."""
    try:
        check_state_dict(state_dict, expected_shapes(config))
    except UserInputError as err:
        raise UserInputError(f"{src}: {err}") from None
    bad = all_finite(state_dict)
    if bad is not None:
        raise UserInputError(f"{src}: {bad} holds NaN or infinity; the file is damaged")
    return write_converted_base(dst, ConvertedBase(state_dict, config))
