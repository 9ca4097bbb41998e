"""One contract per artifact: the `formats.FORMATS` index matches the code and the docs, every artifact
round-trips through its writer and reader, every reader refuses the others' files by tag, adapters
follow peft's config + state split, and a converted base's NaN/Inf check is skipped only for the very
file that was checked."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from my3dgen_cli.adapter_file import AdapterFile, read_adapter, write_adapter
from my3dgen_cli.eg3d import build_generator
from my3dgen_cli.eg3d.camera import lookat_camera
from my3dgen_cli.eg3d.configs import NAMED_CONFIGS
from my3dgen_cli.errors import UserInputError
from my3dgen_cli.formats import FORMATS, resolve, tags
from my3dgen_cli.identity import (
    Anchors,
    Latent,
    PartialAnchors,
    write_anchors,
    write_latent,
    write_partial_anchors,
)
from my3dgen_cli.lora import (
    AdapterConfig,
    adapter_config,
    adapter_layers,
    add_adapters,
    get_adapter_state,
    set_adapter_state,
)
from my3dgen_cli.personalize.checkpoints import (
    CHECKPOINT_FORMAT,
    TrainingCheckpoint,
    read_training_checkpoint,
    write_training_checkpoint,
)
from my3dgen_cli.weights import converted
from my3dgen_cli.weights.converted import ConvertedBase, read_converted_base, write_converted_base

ROOT = Path(__file__).resolve().parents[1]


def test_every_index_entry_is_in_its_module_and_in_the_docs() -> None:
    doc = (ROOT / "docs" / "formats.md").read_text()
    seen: set[str] = set()
    for fmt in FORMATS:
        assert dataclasses.is_dataclass(resolve(fmt, fmt.contract)), fmt.artifact
        assert callable(resolve(fmt, fmt.reader)) and (fmt.writer is None or callable(resolve(fmt, fmt.writer)))
        for name in (fmt.contract, fmt.reader, fmt.writer):
            if name is not None:
                assert f"`{name.rpartition(':')[2]}`" in doc, f"docs/formats.md does not name {name}"
        for tag in fmt.tags:
            value = resolve(fmt, tag)
            assert isinstance(value, str) and value not in seen and f"`{value}`" in doc, (fmt.artifact, tag)
            seen.add(value)
    assert set(tags()) == seen


def _tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_generator("tiny")


def _samples(tmp_path: Path) -> dict[str, tuple[Path, Any]]:
    """One valid file of every artifact my3dgen writes, by artifact name: (path, what was written)."""
    G = _tiny()
    ws = torch.randn(1, G.num_ws, G.w_dim)
    state = {"backbone.synthesis.b4.conv1.lora_A": torch.randn(1, 9),
             "backbone.synthesis.b4.conv1.lora_B": torch.randn(4, 1)}
    made = {
        "adapter": (AdapterFile(state, AdapterConfig(1, 2.0, "peft", ("x",)), "tiny", "ab" * 32, {"k": 1}),
                    write_adapter, "a.safetensors"),
        "anchors": (Anchors(ws.repeat(2, 1, 1), torch.randn(2, 25), ["a.png", "b.png"], {"space": "w+"}),
                    write_anchors, "an.safetensors"),
        "partial anchors": (PartialAnchors(ws.repeat(4, 1, 1), {"photos": ["a.png"], "chunk": 4}),
                            write_partial_anchors, "p.safetensors"),
        "latent": (Latent(ws, torch.randn(1, 25), "tiny", "ana", "w+", {"psnr": 30.0}), write_latent, "l.latent"),
        "converted base": (ConvertedBase({k: v for k, v in G.state_dict().items()}, NAMED_CONFIGS["tiny"]()),
                           write_converted_base, "b.safetensors"),
        "training checkpoint": (TrainingCheckpoint(3, [torch.randn(2)], {"state": {}, "param_groups": []},
                                                   torch.Generator().get_state(), [{"step": 1, "loss": 0.5}],
                                                   {"photos": 2}), write_training_checkpoint, "step-000003.pt"),
    }
    return {name: (write(tmp_path / file, obj), obj) for name, (obj, write, file) in made.items()}


def test_every_artifact_round_trips(tmp_path: Path) -> None:
    samples = _samples(tmp_path)
    by_name = {fmt.artifact: fmt for fmt in FORMATS}
    assert set(samples) == {fmt.artifact for fmt in FORMATS if fmt.writer is not None}
    for name, (path, written) in samples.items():
        back = resolve(by_name[name], by_name[name].reader)(path)
        assert type(back) is type(written), name
        for field in dataclasses.fields(written):
            a, b = getattr(written, field.name), getattr(back, field.name)
            if name == "converted base" and field.name == "config":
                assert all(b[k] == a[k] for k in a), name  # + format, source, fingerprint on disk
            elif isinstance(a, torch.Tensor):
                assert torch.equal(a, b), (name, field.name)
            elif isinstance(a, dict) and a and isinstance(next(iter(a.values())), torch.Tensor):
                assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (name, field.name)
            elif isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
                assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), (name, field.name)
            elif not (name == "adapter" and field.name in ("config", "format", "my3dgen_version")):
                assert a == b, (name, field.name)
    adapter = read_adapter(samples["adapter"][0])
    assert adapter.config == dataclasses.replace(samples["adapter"][1].config,
                                                 layers=("backbone.synthesis.b4.conv1",))


def test_every_reader_refuses_another_artifacts_file(tmp_path: Path) -> None:
    samples = _samples(tmp_path)
    by_name = {fmt.artifact: fmt for fmt in FORMATS}
    safetensors = [n for n, (p, _) in samples.items() if p.suffix in (".safetensors", ".latent")]
    for reader in safetensors:
        for other in safetensors:
            if other == reader:
                continue
            target = samples[other][0]
            if reader == "converted base":  # its reader wants the JSON beside: give it the base's own
                target = tmp_path / "other" / f"{target.stem}.safetensors"
                target.parent.mkdir(exist_ok=True)
                target.write_bytes(samples[other][0].read_bytes())
                target.with_suffix(".json").write_bytes(samples[reader][0].with_suffix(".json").read_bytes())
            with pytest.raises(UserInputError, match="got format") as err:
                resolve(by_name[reader], by_name[reader].reader)(target)
            assert "\n" not in str(err.value)


@pytest.mark.parametrize(("change", "fragment"), [
    ({"format": "my3dgen-train-checkpoint/0"}, "got format"),
    ({"step": "3"}, "step is a str, expected a int"),
    ({"step": True}, "step is a bool"),
    ({"params": [torch.tensor([float("nan")])]}, "not finite floating point"),
    ({"params": [torch.tensor([1])]}, "not finite floating point"),
    ({"fingerprint": []}, "fingerprint is a list"),
    ({"scaler": 1.0}, "scaler is a float"),
])
def test_training_checkpoint_reader_refuses_bad_entries(tmp_path: Path, change: dict[str, Any], fragment: str) -> None:
    state = {"format": CHECKPOINT_FORMAT, "step": 3, "params": [torch.zeros(2)], "optimizer": {},
             "rng": torch.Generator().get_state(), "log": [], "fingerprint": {}, **change}
    path = tmp_path / "step-000003.pt"
    torch.save(state, path)
    with pytest.raises(UserInputError, match="pass --force instead of --resume") as err:
        read_training_checkpoint(path)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_training_checkpoint_reader_refuses_garbage_and_code(tmp_path: Path) -> None:
    path = tmp_path / "step-000001.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserInputError, match="not a readable training checkpoint"):
        read_training_checkpoint(path)
    torch.save({"format": CHECKPOINT_FORMAT, "evil": os.getcwd}, path)  # a global weights_only refuses
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's own warnings about the refusal are not shown to the user
        with pytest.raises(UserInputError, match="holds objects other than tensors and numbers") as err:
            read_training_checkpoint(path)
    assert "weights_only" not in str(err.value)  # torch's advice to load it unsafely is not passed on


# --- adapters as peft has them -------------------------------------------------------------------


def test_adapter_config_and_state_move_an_adapter_between_models() -> None:
    G = _tiny()
    add_adapters(G, rank=2, alpha=4.0, style="peft")
    with torch.no_grad():
        for a in adapter_layers(G).values():
            a.lora_B.normal_(std=0.05)
    config, state = adapter_config(G), get_adapter_state(G)
    assert config is not None and config.rank == 2 and config.scale == 2.0 and config.style == "peft"
    H = _tiny()
    assert adapter_config(H) is None
    add_adapters(H, config=config)
    set_adapter_state(H, state)
    assert get_adapter_state(H).keys() == state.keys()
    assert all(torch.equal(get_adapter_state(H)[k], v) for k, v in state.items())
    x = torch.randn(1, H.num_ws, H.w_dim)
    c = lookat_camera(20.0, 0.0)
    with torch.no_grad():
        a = G.synthesis(x, c, noise_mode="const", sampling="deterministic")["image"]
        b = H.synthesis(x, c, noise_mode="const", sampling="deterministic")["image"]
    assert torch.isfinite(a).all() and torch.equal(a, b)


def test_set_adapter_state_refuses_other_layers_and_shapes() -> None:
    G = _tiny()
    add_adapters(G, rank=1)
    state = get_adapter_state(G)
    first = next(iter(state))
    with pytest.raises(UserInputError, match="first mismatch"):
        set_adapter_state(G, {k: v for k, v in state.items() if k != first}, "x.safetensors")
    with pytest.raises(UserInputError, match=r"got shape \(1, 1\)"):
        set_adapter_state(G, {**state, first: torch.zeros(1, 1)}, "x.safetensors")
    with pytest.raises(UserInputError, match="backbone.mapping.fc0.weight"):
        set_adapter_state(G, {**state, "backbone.mapping.fc0.weight": G.backbone.mapping.fc0.weight}, "x")


def test_adapter_config_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="rank"):
        AdapterConfig(rank=0)
    with pytest.raises(ValueError, match="style"):
        AdapterConfig(style="evil")
    assert AdapterConfig(rank=4).alpha == 4.0  # alpha defaults to rank: scale 1


# --- the converted base's NaN/Inf check ---------------------------------------------------------------


def _counting_checks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = converted.all_finite

    def counted(state: dict[str, torch.Tensor]) -> str | None:
        calls.append(1)
        return real(state)

    monkeypatch.setattr(converted, "all_finite", counted)
    return calls


def test_finite_check_is_skipped_only_for_the_file_that_was_checked(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_converted_base(tmp_path / "b.safetensors",
                                ConvertedBase(_tiny().state_dict(), NAMED_CONFIGS["tiny"]()))
    entry = json.loads(path.with_suffix(".json").read_text())["fingerprint"]
    assert entry["finite"] is True and entry["size"] == path.stat().st_size
    calls = _counting_checks(monkeypatch)
    read_converted_base(path)
    assert calls == [], "the marker of this very file is trusted"
    read_converted_base(path, full_check=True)
    assert calls == [1]
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # same bytes, touched: checked again
    read_converted_base(path)
    assert calls == [1, 1]


def test_a_base_written_with_nan_is_marked_and_refused(tmp_path: Path) -> None:
    state = _tiny().state_dict()
    key = next(k for k, t in state.items() if t.is_floating_point() and t.numel() > 1)
    state[key] = state[key].clone().fill_(float("nan"))
    path = write_converted_base(tmp_path / "b.safetensors", ConvertedBase(state, NAMED_CONFIGS["tiny"]()))
    assert json.loads(path.with_suffix(".json").read_text())["fingerprint"]["finite"] is False
    with pytest.raises(UserInputError, match=f"{key} holds NaN or Inf"):
        read_converted_base(path)
