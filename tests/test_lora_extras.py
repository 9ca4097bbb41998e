"""Adapters with trained extras (My3DGen's biases, noise strengths and b4.const beside the LoRA factors):
round trip, unload restores the base, merge keeps them, the fingerprint stays the base's, training
with them resumes exactly, and the full-size count is the paper's 243,965."""

from __future__ import annotations

import pytest
import torch

from my3dgen_cli.adapter_file import (
    ADAPTER_FORMAT,
    ADAPTER_FORMAT_EXTRAS,
    AdapterFile,
    load_adapter,
    read_adapter,
    save_adapter,
    write_adapter,
)
from my3dgen_cli.eg3d import build_generator
from my3dgen_cli.errors import UserInputError
from my3dgen_cli.lora import (
    AdapterConfig,
    adapter_config,
    add_adapters,
    add_extras,
    base_fingerprint,
    count_adapter_parameters,
    extra_names,
    get_adapter_state,
    match_extras,
    merge_adapters,
    remove_adapters,
)
from my3dgen_cli.personalize.pipeline import PersonalizeConfig
from my3dgen_cli.personalize.training import TrainingInterrupted
from tests.personalize_helpers import fresh, make_person
from tests.test_lora import _render, _tiny
from tests.test_personalize import _train

pytestmark = pytest.mark.usefixtures("one_thread_offline")


def _personalized(seed: int = 0):
    """A tiny generator with random LoRA factors and random offsets on every trained extra."""
    G = _tiny()
    params = add_adapters(G, rank=1) + add_extras(G, match_extras(G))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return G


def test_full_size_trained_set_is_the_papers_count() -> None:
    """README of the My3DGen fixture: 219,174 LoRA + 24,791 other = 243,965 trainable values."""
    with torch.device("meta"):
        G = build_generator("ffhq512-128")
        add_adapters(G, rank=1)
        lora = count_adapter_parameters(G)
        add_extras(G, match_extras(G))
    assert lora == 219_174
    assert count_adapter_parameters(G) - lora == 24_791
    assert count_adapter_parameters(G) == 243_965
    names = extra_names(G)
    assert len(names) == 70 and "backbone.synthesis.b4.const" in names
    assert "superresolution.block1.torgb.affine.bias" in names
    assert "superresolution.block0.conv1.noise_strength" in names
    assert not any(n.startswith(("backbone.mapping", "decoder")) or n.endswith(".weight") for n in names)


def test_extras_round_trip_unload_and_merge(tmp_path) -> None:
    base = _render(_tiny())
    fingerprint = base_fingerprint(_tiny())
    G = _personalized()
    assert base_fingerprint(G) == fingerprint, "the fingerprint is the base's, whatever the extras hold"
    adapted = _render(G)
    assert (adapted - base).abs().max() > 1e-3
    path = save_adapter(G, tmp_path / "a.safetensors", "tiny", fingerprint)
    adapter = read_adapter(path)
    tensors = adapter.tensors
    assert adapter.format == ADAPTER_FORMAT_EXTRAS
    assert "backbone.synthesis.b4.const" in tensors and "backbone.synthesis.b4.conv1.lora_A" in tensors

    H = _tiny()
    load_adapter(H, path)
    assert torch.equal(_render(H), adapted)
    assert get_adapter_state(H).keys() == tensors.keys()
    remove_adapters(H)
    assert torch.equal(_render(H), base), "unloading puts the base's own biases back"
    assert base_fingerprint(H) == fingerprint

    M = _tiny()
    load_adapter(M, path)
    merge_adapters(M)
    assert (_render(M) - adapted).abs().max() <= 1e-5
    assert extra_names(M) == [] and torch.equal(M.backbone.synthesis.b4.const, tensors["backbone.synthesis.b4.const"])


def test_adapter_without_extras_keeps_the_old_format(tmp_path) -> None:
    G = _tiny()
    add_adapters(G, rank=1)
    adapter = read_adapter(save_adapter(G, tmp_path / "a.safetensors", "tiny", base_fingerprint(_tiny())))
    assert adapter.format == ADAPTER_FORMAT


def test_an_extra_outside_the_trained_set_is_refused_by_name(tmp_path) -> None:
    G = _personalized()
    tensors = get_adapter_state(G)
    tensors["backbone.mapping.fc0.weight"] = G.backbone.mapping.fc0.weight.detach().clone()
    config = AdapterConfig(1, 1.0, "my3dgen", adapter_config(G).targets)
    path = write_adapter(tmp_path / "bad.safetensors", AdapterFile(tensors, config, "tiny", base_fingerprint(_tiny())))
    H = _tiny()
    with pytest.raises(UserInputError, match=r"backbone\.mapping\.fc0\.weight"):
        load_adapter(H, path)
    assert extra_names(H) == [] and not hasattr(H, "_my3dgen_adapter_config"), "nothing attached"


def test_training_with_extras_trains_them_and_resumes_exactly(tmp_path) -> None:
    person = make_person()
    config = PersonalizeConfig(steps=5, batch=2, sym=False, checkpoint_every=2, seed=1, train_extras=True)
    G_full, full = _train(person, config, tmp_path / "a")
    base = fresh(person)
    assert full.parameters == count_adapter_parameters(G_full) > count_adapter_parameters(base) == 0
    moved = [n for n in extra_names(G_full)
             if not torch.equal(dict(G_full.named_parameters())[n], dict(base.named_parameters())[n])]
    assert "backbone.synthesis.b4.const" in moved and any(n.endswith(".bias") for n in moved)
    for name, t in G_full.state_dict().items():  # nothing else of the base moved
        if ".adapter." not in name and name not in extra_names(G_full):
            assert torch.equal(t, base.state_dict()[name]), name

    with pytest.raises(TrainingInterrupted):
        _train(person, config, tmp_path / "b", stop_at=3)
    G_resumed, resumed = _train(person, config, tmp_path / "b", resume=True)
    assert resumed.resumed_from == 3 and resumed.log == full.log
    a, b = get_adapter_state(G_full), get_adapter_state(G_resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    without = PersonalizeConfig(steps=5, batch=2, sym=False, checkpoint_every=2, seed=1, train_extras=False)
    with pytest.raises(UserInputError, match="train_extras"):
        _train(person, without, tmp_path / "b", resume=True)
