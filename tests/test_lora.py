"""LoRA adapters: a no-op when fresh, exact merge, safe save/load, wrong base refused (peft's checks)."""

from __future__ import annotations

import pytest
import torch

from my3dgen_cli.adapter_file import load_adapter, save_adapter
from my3dgen_cli.eg3d import build_generator
from my3dgen_cli.eg3d.camera import frontal_camera, lookat_camera
from my3dgen_cli.errors import IncompatibleAdapterError
from my3dgen_cli.lora import (
    adapter_config,
    adapter_layers,
    add_adapters,
    base_fingerprint,
    count_adapter_parameters,
    merge_adapters,
    remove_adapters,
)


def _render(G, seed: int = 0) -> torch.Tensor:
    z = torch.randn(2, G.z_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return G.synthesis(G.mapping(z, frontal_camera(2)), lookat_camera([-20.0, 15.0], 0.0))["image"]


def _tiny(seed: int = 0):
    torch.manual_seed(seed)
    return build_generator("tiny")


def _randomize(params, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_fresh_adapter_is_bit_identical_and_only_adapters_train() -> None:
    G = _tiny()
    before = _render(G)
    params = add_adapters(G, rank=2)
    assert torch.equal(_render(G), before)
    trainable = [p for p in G.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in params}
    assert len(adapter_layers(G)) > 0


def test_merged_unmerged_and_unloaded_outputs_agree() -> None:
    G = _tiny()
    base = _render(G)
    params = add_adapters(G, rank=1)
    _randomize(params)
    adapted = _render(G)
    assert (adapted - base).abs().max() > 1e-3, "a non-zero adapter must change the output"
    merged = merge_adapters(_copy_with_adapters(G))
    assert (_render(merged) - adapted).abs().max() <= 1e-5
    assert adapter_config(merged) is None and adapter_config(G) is not None
    remove_adapters(G)
    assert torch.equal(_render(G), base)
    assert adapter_config(G) is None  # unloaded: nothing says an adapter is there


def _copy_with_adapters(G):
    import copy

    return copy.deepcopy(G)


def test_default_targets_full_size_parameter_budget() -> None:
    with torch.device("meta"):
        G = build_generator("ffhq512-128")
        add_adapters(G, rank=1)
    count = count_adapter_parameters(G)
    assert count <= 250_000
    assert 30_662_136 / count > 100  # > 100x fewer than full fine-tuning
    names = set(adapter_layers(G))
    assert "backbone.synthesis.b256.conv0" in names and "superresolution.block1.torgb.affine" in names
    assert not any(n.startswith(("backbone.mapping", "decoder")) for n in names)


def test_save_load_round_trip_and_wrong_base_is_refused(tmp_path) -> None:
    G = _tiny()
    fingerprint = base_fingerprint(G)
    _randomize(add_adapters(G, rank=1))
    adapted = _render(G)
    path = save_adapter(G, tmp_path / "adapter.safetensors", "tiny", fingerprint, extra={"steps": 3})
    assert path.stat().st_size < 1_000_000

    H = _tiny()
    adapter = load_adapter(H, path)
    assert adapter.config.rank == 1 and adapter.extra == {"steps": 3}
    assert torch.equal(_render(H), adapted)

    other = _tiny(seed=1)
    with pytest.raises(IncompatibleAdapterError, match="made on base 'tiny'"):
        load_adapter(other, path)
