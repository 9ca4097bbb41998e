"""Opening a base without random initialisation gives the generator the old path gave, bit for bit.

The reference is the path every open took before: `build_generator(config)` (random init) then a
copying `load_state_dict`. Compared for a saved tiny base (fp32 and fp16 storage), an
official-format `.pkl` and its conversion, with and without an identity's adapter.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from official_pkl import write_official_pkl
from torch import nn

from my3dgen_cli.adapter_file import load_adapter, save_adapter
from my3dgen_cli.eg3d import build_generator, load_generator
from my3dgen_cli.eg3d.camera import frontal_camera, lookat_camera
from my3dgen_cli.generators import open_base, open_generator, save_local_base
from my3dgen_cli.identity import identity_paths
from my3dgen_cli.lora import add_adapters, base_fingerprint, merge_adapters
from my3dgen_cli.weights.checkpoint import convert_pkl
from my3dgen_cli.weights.converted import ConvertedBase, read_converted_base, write_converted_base
from my3dgen_cli.weights.instantiate import skeleton
from my3dgen_cli.weights.official_pkl import read_official_pkl


def _source() -> nn.Module:
    torch.manual_seed(11)
    G = build_generator("tiny")
    with torch.no_grad():  # non-trivial values where init leaves zeros or constants
        for t in G.state_dict().values():
            t.add_(torch.randn_like(t) * 0.05)
    return G


def _reference(state_dict: dict[str, torch.Tensor], config) -> nn.Module:
    """The old open: random init, then copy the weights in."""
    G = build_generator(config)
    G.load_state_dict(state_dict, strict=True)
    return G.eval()


def _assert_same_generator(fast: nn.Module, ref: nn.Module) -> None:
    got, want = dict(fast.named_parameters()), dict(ref.named_parameters())
    assert list(got) == list(want)
    for name, p in want.items():
        q = got[name]
        assert isinstance(q, nn.Parameter) and q.requires_grad == p.requires_grad, name
        assert q.dtype == p.dtype == torch.float32 and q.device == p.device and q.is_contiguous(), name
        assert torch.equal(q, p), name
    got_b, want_b = dict(fast.named_buffers()), dict(ref.named_buffers())
    assert list(got_b) == list(want_b) and got_b
    for name, b in want_b.items():
        assert got_b[name].dtype == b.dtype and torch.equal(got_b[name], b), name
    assert fast.training is ref.training is False
    assert fast.neural_rendering_resolution == ref.neural_rendering_resolution
    assert fast.rendering_kwargs == ref.rendering_kwargs
    z = torch.randn(2, ref.z_dim, generator=torch.Generator().manual_seed(0))
    c = lookat_camera([-20.0, 15.0], 5.0)
    with torch.no_grad():
        a = fast.synthesis(fast.mapping(z, frontal_camera(2), truncation_psi=0.7), c)
        b = ref.synthesis(ref.mapping(z, frontal_camera(2), truncation_psi=0.7), c)
    for key in ("image", "image_raw", "image_depth"):
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_converted_base_opens_equal_to_the_old_path(tmp_path: Path, dtype) -> None:
    source = _source()
    path = write_converted_base(tmp_path / "b.safetensors", ConvertedBase(source.state_dict(), source.config.to_dict()),
                                dtype=dtype)
    base = read_converted_base(path)
    state_dict, config = base.state_dict, base.config
    assert {t.dtype for t in state_dict.values()} == {dtype or torch.float32}
    rng = torch.get_rng_state()
    fast = load_generator(path)
    assert torch.equal(torch.get_rng_state(), rng)  # no random init: the global RNG is untouched
    _assert_same_generator(fast, _reference(state_dict, config))


def test_official_pkl_and_its_conversion_open_equal_to_the_old_path(tmp_path: Path) -> None:
    source = _source()
    config = source.config.to_dict()
    half = {name: t.half() for name, t in source.state_dict().items()}  # as the parity fixture stores
    pkl = write_official_pkl(tmp_path / "net.pkl", half, config["init_kwargs"], config["rendering_kwargs"],
                             config["neural_rendering_resolution"])
    ckpt = read_official_pkl(pkl)
    reference = _reference(ckpt.state_dict, ckpt.config())
    _assert_same_generator(load_generator(pkl), reference)
    _assert_same_generator(load_generator(convert_pkl(pkl, tmp_path / "net.safetensors")), reference)


def test_identity_on_a_local_base_opens_equal_and_leaves_the_file_alone() -> None:
    source = _source()
    path = save_local_base(source, "fast-base")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    add_adapters(source, rank=2)
    with torch.no_grad():
        for name, p in source.named_parameters():
            if ".adapter." in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    adapter = identity_paths("ana").adapter
    adapter.parent.mkdir(parents=True)
    save_adapter(source, adapter, "fast-base", base_fingerprint(source))

    G, ref, meta = open_generator(identity="ana")
    base = read_converted_base(path)
    state_dict, config = base.state_dict, base.config
    reference = _reference(state_dict, config)
    load_adapter(reference, adapter, base_sha256=ref.sha256)
    for p in reference.parameters():
        p.requires_grad_(False)
    assert meta is not None and ref.name == "fast-base"
    _assert_same_generator(G, reference)

    # The weights stay mapped from the file: writing to them (a merge) never reaches the file.
    merge_adapters(G)
    merge_adapters(reference)
    _assert_same_generator(G, reference)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    again, _ = open_base("fast-base")
    _assert_same_generator(again, _reference(state_dict, config))


def test_parameters_do_not_share_memory(tmp_path: Path) -> None:
    source = _source()
    G = load_generator(write_converted_base(tmp_path / "b.safetensors",
                                            ConvertedBase(source.state_dict(), source.config.to_dict())))
    tensors = [*G.parameters(), *G.buffers()]
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == len(tensors)


def test_only_checkpoint_tensors_are_left_uninitialised() -> None:
    """Every tensor the state dict does not cover (non-persistent buffers, tensor attributes) is
    computed exactly as a normal build computes it; the skipped random ones are all assigned."""
    torch.manual_seed(0)
    normal, bare = build_generator("tiny"), skeleton("tiny")
    in_checkpoint = set(bare.state_dict())
    assert {n for n, _ in bare.named_parameters()} <= in_checkpoint
    for (prefix, a), (_, b) in zip(normal.named_modules(), bare.named_modules(), strict=True):
        extra = [k for k in a._buffers if f"{prefix}.{k}".lstrip(".") not in in_checkpoint]
        extra += [k for k, v in vars(a).items() if isinstance(v, torch.Tensor)]
        for k in extra:
            assert torch.equal(getattr(a, k), getattr(b, k)), f"{prefix}.{k}"


def test_building_for_shapes_leaves_module_level_tensors_alone() -> None:
    """In a fresh process, taking the shapes first must not touch camera.py's module-level tensor:
    shapes used to be taken under `torch.device("meta")`, which made it a meta tensor for good."""
    code = (
        "from my3dgen_cli.weights.fit import expected_shapes\n"
        "expected_shapes('tiny')\n"
        "from my3dgen_cli.eg3d.camera import lookat_camera, mirror_camera\n"
        "print(float((mirror_camera(lookat_camera(30.0, 5.0)) - lookat_camera(-30.0, 5.0)).abs().max()))\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip()) < 1e-6  # was 2.3: the mirror matrix had become a meta tensor
