"""Base fingerprints are hashed once when a base is written and read back when it is opened.

Tiny config on CPU: a local base written with `save_local_base` and an identity whose adapter was
made on it, as `personalize` would leave them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from my3dgen_cli import lora
from my3dgen_cli.adapter_file import save_adapter
from my3dgen_cli.cli import app
from my3dgen_cli.eg3d import build_generator, load_generator
from my3dgen_cli.errors import IncompatibleAdapterError
from my3dgen_cli.generators import open_base, open_generator, save_local_base
from my3dgen_cli.identity import identity_paths
from my3dgen_cli.weights import fingerprint
from my3dgen_cli.weights.checkpoint import convert_pkl
from my3dgen_cli.weights.converted import ConvertedBase, write_converted_base
from tests.official_pkl import write_official_pkl


def _tiny(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_generator("tiny")


def _make_identity(name: str, base: str, seed: int = 0) -> str:
    """Save a tiny local base `base` from `seed` and an identity adapter made on it (fingerprint hashed)."""
    G = _tiny(seed)
    save_local_base(G, base)
    lora.add_adapters(G, rank=1, generator=torch.Generator().manual_seed(1))
    path = identity_paths(name).adapter
    path.parent.mkdir(parents=True, exist_ok=True)
    save_adapter(G, path, base_name=base, base_sha256=lora.base_fingerprint(G))
    return name


def _sidecar(weights: Path) -> dict:
    return json.loads(weights.with_suffix(".json").read_text(encoding="utf-8"))


def forbid_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any weight hashing from here on fails the test."""

    def boom(*_args, **_kwargs):
        raise AssertionError("the base weights were hashed")

    monkeypatch.setattr(lora, "base_fingerprint", boom)
    monkeypatch.setattr(fingerprint, "state_fingerprint", boom)


def test_fingerprint_value_is_unchanged_from_earlier_versions() -> None:
    # Computed by my3dgen 0.x's lora.base_fingerprint: identities made then must keep matching.
    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1.5, -2.0], dtype=torch.float16)}
    expected = "2e1edc78247b083249e8891ef885d880c9c54cbe4b8400b3c1e7c252de16f0fb"
    assert fingerprint.state_fingerprint(state) == expected


@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_stored_fingerprint_equals_the_computed_one(tmp_path: Path, dtype: torch.dtype | None) -> None:
    G = _tiny(0)
    dst = write_converted_base(tmp_path / "g.safetensors", ConvertedBase(G.state_dict(), G.config.to_dict()),
                               dtype=dtype)
    entry = _sidecar(dst)["fingerprint"]
    assert entry["sha256"] == lora.base_fingerprint(load_generator(dst))  # fp16 storage: the loaded values
    assert entry["size"] == dst.stat().st_size and entry["mtime_ns"] == dst.stat().st_mtime_ns
    assert (dtype is None) == (entry["sha256"] == lora.base_fingerprint(G))


def test_opening_a_converted_base_does_not_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    _make_identity("ana", base="tiny-test")
    forbid_hashing(monkeypatch)
    G, ref, meta = open_generator(identity="ana")
    assert meta is not None and ref.name == "tiny-test"
    assert ref.sha256 == _sidecar(ref.path)["fingerprint"]["sha256"]


def test_cli_refuses_adapter_of_another_base_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _make_identity("ana", base="tiny-test", seed=0)
    save_local_base(_tiny(7), "other")
    forbid_hashing(monkeypatch)
    with pytest.raises(IncompatibleAdapterError, match="was made on base 'tiny-test'"):
        open_generator(base="other", identity="ana")
    out = tmp_path / "x.png"
    result = CliRunner().invoke(app, ["render", "--identity", "ana", "--base", "other", "--seed", "1", "-o", str(out)])
    assert result.exit_code != 0 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "was made on base 'tiny-test'" in errors[0]
    assert not out.exists()


def test_base_without_stored_fingerprint_is_hashed_once_then_stored() -> None:
    _make_identity("ana", base="tiny-test")
    path = save_local_base(_tiny(0), "tiny-test")
    doc = _sidecar(path)
    expected = doc.pop("fingerprint")["sha256"]
    path.with_suffix(".json").write_text(json.dumps(doc), encoding="utf-8")  # as written before this cache

    _, ref, meta = open_generator(identity="ana")  # hashes: the adapter still matches
    assert ref.sha256 == expected and meta is not None
    assert _sidecar(path)["fingerprint"] == {"sha256": expected, **fingerprint.weights_stamp(path), "finite": True}
    assert open_base("tiny-test")[1].sha256 == expected


def test_unwritable_sidecar_still_opens(monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_local_base(_tiny(0), "tiny-test")
    doc = _sidecar(path)
    expected = doc.pop("fingerprint")["sha256"]
    path.with_suffix(".json").write_text(json.dumps(doc), encoding="utf-8")

    def refuse(*_args, **_kwargs):
        raise PermissionError("read-only cache")

    monkeypatch.setattr(fingerprint, "write_text_atomic", refuse)
    assert open_base("tiny-test")[1].sha256 == expected
    assert "fingerprint" not in _sidecar(path)


def test_weights_edited_by_hand_are_hashed_again() -> None:
    """Same size, same conversion id, other values: the stored value is not trusted."""
    _make_identity("ana", base="tiny-test")
    path = save_local_base(_tiny(0), "tiny-test")
    old = _sidecar(path)["fingerprint"]
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    name = next(k for k, t in tensors.items() if t.is_floating_point() and t.numel() > 1)
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, str(path), metadata=meta)
    # A coarse file-system clock could leave mtime unchanged; make sure it moved as it would for a person.
    os.utime(path, ns=(old["mtime_ns"] + 10**9, old["mtime_ns"] + 10**9))
    assert path.stat().st_size == old["size"]

    with pytest.raises(IncompatibleAdapterError, match="was made on base"):
        open_generator(identity="ana")
    new = _sidecar(path)["fingerprint"]
    assert new["sha256"] != old["sha256"]
    assert new["sha256"] == lora.base_fingerprint(load_generator(path))


def test_official_pkl_is_hashed_and_its_conversion_stores_the_same_value(tmp_path: Path) -> None:
    """A .pkl has no sidecar: hashed on open, nothing written beside it; converting it (what the zoo
    does) stores the value an adapter made on the .pkl recorded."""
    G = _tiny(3)
    cfg = G.config.to_dict()
    pkl = write_official_pkl(tmp_path / "net.pkl", G.state_dict(), cfg["init_kwargs"], cfg["rendering_kwargs"],
                             cfg["neural_rendering_resolution"])
    _, ref = open_base(str(pkl))
    assert ref.sha256 == lora.base_fingerprint(G)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.pkl"]
    dst = convert_pkl(pkl, tmp_path / "conv" / "generator.safetensors")
    assert _sidecar(dst)["fingerprint"]["sha256"] == ref.sha256
