"""Safe reading of official EG3D pickles and the converted safetensors + JSON format."""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import pickle
import random
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from my3dgen_cli.eg3d import build_generator
from my3dgen_cli.eg3d.configs import NAMED_CONFIGS
from my3dgen_cli.errors import UnsafeCheckpointError, UserInputError
from my3dgen_cli.weights import checkpoint
from my3dgen_cli.weights.checkpoint import convert_pkl
from my3dgen_cli.weights.converted import ConvertedBase, read_converted_base, write_converted_base
from my3dgen_cli.weights.fit import ConfigMismatchError, check_config, check_state_dict, config_names
from my3dgen_cli.weights.official_pkl import read_official_pkl
from my3dgen_cli.weights.safe_unpickle import PersistentObject, safe_load
from tests.official_pkl import build_module_tree, write_discriminator_pkl, write_official_pkl

RELEASED = ("ffhq512-128", "ffhqrebalanced512-128", "ffhqrebalanced512-64", "afhqcats512-128")


def _key_file_shapes(shared: Path) -> dict[str, tuple[int, ...]]:
    """eg3d/g_ema_state_dict_keys.txt: `name<TAB>[d0, d1, ...]` per line (official ffhq512-128)."""
    shapes = {}
    for line in (shared / "eg3d" / "g_ema_state_dict_keys.txt").read_text().splitlines():
        name, shape = line.split("\t")
        shapes[name] = tuple(json.loads(shape))
    return shapes


@pytest.fixture
def parity(shared_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Parity weights (fp16, official names) in official key-file order, and config.json."""
    weights = load_file(shared_dir / "eg3d_parity" / "weights.safetensors")
    order = list(_key_file_shapes(shared_dir))
    assert set(order) == set(weights)
    config = json.loads((shared_dir / "eg3d_parity" / "config.json").read_text())
    return {name: weights[name] for name in order}, config


def _write_parity(path: Path, parity, resolution: int = 128, **options) -> Path:
    """The parity weights and config as an official .pkl (options: those of write_official_pkl)."""
    state_dict, config = parity
    return write_official_pkl(
        path, state_dict, config["init_kwargs"], config["rendering_kwargs"], resolution, **options
    )


@pytest.fixture
def parity_pkl(tmp_path: Path, parity) -> Path:
    return _write_parity(tmp_path / "net.pkl", parity)


def _shapes(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in state_dict.items()}


# --- reading ------------------------------------------------------------------------------------


def test_round_trip_is_bitwise_and_in_module_order(parity, parity_pkl: Path) -> None:
    state_dict, config = parity
    ckpt = read_official_pkl(parity_pkl)

    assert set(ckpt.state_dict) == set(state_dict) and len(ckpt.state_dict) == 176
    for name, tensor in state_dict.items():
        got = ckpt.state_dict[name]
        assert got.dtype == tensor.dtype == torch.float16, name
        assert torch.equal(got, tensor), name
    # Order: what nn.Module.state_dict() gives for the same tree (own tensors, then children).
    tree = build_module_tree(state_dict, config["init_kwargs"], config["rendering_kwargs"], 128)
    assert list(ckpt.state_dict) == list(tree.state_dict())
    assert ckpt.init_kwargs == config["init_kwargs"]
    assert ckpt.rendering_kwargs == config["rendering_kwargs"]
    assert ckpt.neural_rendering_resolution == 128
    assert ckpt.class_name == config["class_name"] == "training.triplane.TriPlaneGenerator"
    # Non-registered tensors (ImportanceRenderer.plane_axes) are not part of the state dict.
    assert not any("plane_axes" in name for name in ckpt.state_dict)


def test_training_loop_layout_drops_dataset_label_std_and_notes_it(tmp_path: Path, parity, parity_pkl: Path) -> None:
    with parity_pkl.open("rb") as f:  # the writer made what the training loop makes
        raw = safe_load(f)
    assert sorted(raw) == ["D", "G", "G_ema", "augment_pipe", "training_set_kwargs"]
    assert raw["D"].class_name == "DualDiscriminator" and raw["augment_pipe"].class_name == "AugmentPipe"
    for net in ("G", "G_ema"):
        assert raw[net].state["_buffers"]["dataset_label_std"].shape == (25,)

    for net in ("G_ema", "G"):
        ckpt = read_official_pkl(parity_pkl, network=net)
        assert ckpt.dropped == ("dataset_label_std",) and "dataset_label_std" not in ckpt.state_dict
        assert len(ckpt.state_dict) == 176
    doc = json.loads(convert_pkl(parity_pkl, tmp_path / "p.safetensors").with_suffix(".json").read_text())
    assert doc["dropped"] == ["dataset_label_std"]
    assert "dataset_label_std" not in load_file(tmp_path / "p.safetensors")


@pytest.mark.parametrize("layout", ["network", "g_ema_dict"])
def test_networks_saved_again_read_the_same(tmp_path: Path, parity, layout: str) -> None:
    state_dict, config = parity
    path = _write_parity(tmp_path / f"{layout}.pkl", parity, layout=layout)
    with path.open("rb") as f:
        raw = safe_load(f)
    assert isinstance(raw, PersistentObject) if layout == "network" else sorted(raw) == ["G_ema"]
    ckpt = read_official_pkl(path)
    assert ckpt.dropped == ("dataset_label_std",) and ckpt.init_kwargs == config["init_kwargs"]
    assert set(ckpt.state_dict) == set(state_dict)
    assert all(torch.equal(ckpt.state_dict[name], t) for name, t in state_dict.items())
    G = checkpoint.load_generator(path)
    assert torch.equal(G.backbone.mapping.w_avg, state_dict["backbone.mapping.w_avg"].float())


def test_any_other_unknown_tensor_is_still_an_error(tmp_path: Path, parity) -> None:
    state_dict, config = parity
    extra = {**state_dict, "dataset_label_mean": torch.zeros(25, dtype=torch.float16)}
    path = write_official_pkl(tmp_path / "x.pkl", extra, config["init_kwargs"], config["rendering_kwargs"], 128)
    assert "dataset_label_mean" in read_official_pkl(path).state_dict
    with pytest.raises(UserInputError, match=r"unexpected dataset_label_mean \(shape \(25\)\)") as info:
        checkpoint.load_generator(path)
    assert "\n" not in str(info.value)
    with pytest.raises(UserInputError, match="unexpected dataset_label_mean"):
        convert_pkl(path, tmp_path / "out" / "x.safetensors")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_pickle_of_another_network_is_refused(tmp_path: Path, parity) -> None:
    alone = write_discriminator_pkl(tmp_path / "d.pkl")
    with pytest.raises(UserInputError) as info:
        checkpoint.load_generator(alone)
    assert str(info.value) == (
        f"{alone}: the pickled network is a DualDiscriminator, expected an EG3D generator (TriPlaneGenerator)"
    )
    snapshot = _write_parity(tmp_path / "snap.pkl", parity)
    with pytest.raises(UserInputError, match="'D' is a DualDiscriminator, expected an EG3D generator"):
        read_official_pkl(snapshot, network="D")


# --- configs ------------------------------------------------------------------------------------


def _config_only_pkl(path: Path, config: dict) -> Path:
    """A pickle whose G_ema has `config` and no tensors: enough for the config check."""
    return write_official_pkl(
        path, {}, config["init_kwargs"], config["rendering_kwargs"], config["neural_rendering_resolution"],
        layout="network",
    )


@pytest.mark.parametrize("name", RELEASED)
def test_every_released_config_is_recognised(tmp_path: Path, name: str) -> None:
    config = NAMED_CONFIGS[name]()
    config["rendering_kwargs"]["gpc_reg_prob"] = 0.8  # loss-only settings are not compared
    found = read_official_pkl(_config_only_pkl(tmp_path / f"{name}.pkl", config)).config()
    check_config(found, name, "x.pkl")
    assert name in config_names(found)
    for other in RELEASED:
        if other not in config_names(found):
            with pytest.raises(ConfigMismatchError, match=f"holds a generator of .*{name}.*, not {other}: "):
                check_config(found, other, "x.pkl")


def test_another_config_is_refused_naming_both_and_the_keys(tmp_path: Path, parity) -> None:
    _, config = parity
    found = read_official_pkl(_write_parity(tmp_path / "p.pkl", parity)).config()
    with pytest.raises(ConfigMismatchError) as info:
        check_config(found, "ffhq512-128", "snap.pkl")
    assert str(info.value) == (
        "snap.pkl: holds a generator of an unnamed config, not ffhq512-128: "
        "init_kwargs.channel_base: 4096 vs 32768; init_kwargs.channel_max: 64 vs 512 (file vs ffhq512-128)"
    )
    afhq = read_official_pkl(_config_only_pkl(tmp_path / "a.pkl", NAMED_CONFIGS["afhqcats512-128"]())).config()
    with pytest.raises(ConfigMismatchError) as info:
        check_config(afhq, "ffhqrebalanced512-64", "a.pkl")
    assert str(info.value) == (
        "a.pkl: holds a generator of afhqcats512-128, not ffhqrebalanced512-64: "
        "rendering_kwargs.avg_camera_pivot: [0, 0, -0.06] vs [0, 0, 0.2]; neural_rendering_resolution: 128 vs 64 "
        "(file vs ffhqrebalanced512-64)"
    )
    dst = tmp_path / "out" / "x.safetensors"
    with pytest.raises(ConfigMismatchError):
        convert_pkl(_write_parity(tmp_path / "p.pkl", parity), dst, config="ffhq512-128")
    assert not dst.parent.exists()


def test_reads_the_network_asked_for(parity_pkl: Path) -> None:
    g = read_official_pkl(parity_pkl, network="G")
    assert all(not t.any() for t in g.state_dict.values())  # the helper stores G as zeros


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_every_pickle_protocol_reads_the_same(tmp_path: Path, parity, protocol: int) -> None:
    state_dict, config = parity
    path = _write_parity(tmp_path / "net.pkl", parity, 64, protocol=protocol)
    ckpt = read_official_pkl(path)
    assert all(torch.equal(ckpt.state_dict[name], t) for name, t in state_dict.items())
    assert ckpt.init_kwargs == config["init_kwargs"] and ckpt.neural_rendering_resolution == 64


def test_tensors_with_python_state_come_back_as_plain_tensors() -> None:
    tensor = torch.arange(6.0).reshape(2, 3)[:, 1:]  # a strided view
    tensor.note = "attribute"  # makes torch pickle it through _rebuild_from_type_v2
    param = torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16), requires_grad=False)
    param.note = "attribute"  # _rebuild_parameter_with_state
    data = pickle.dumps({"t": tensor, "p": param})
    assert b"_rebuild_from_type_v2" in data and b"_rebuild_parameter_with_state" in data
    got = safe_load(io.BytesIO(data))
    assert type(got["t"]) is torch.Tensor and torch.equal(got["t"], tensor)
    assert got["p"].dtype == torch.bfloat16 and torch.equal(got["p"], param.data)


def test_module_src_is_never_executed(tmp_path: Path, parity) -> None:
    marker = tmp_path / "module_src_ran"
    src = f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
    path = _write_parity(tmp_path / "net.pkl", parity, 64, module_src=src)
    assert src.encode() in path.read_bytes()
    ckpt = read_official_pkl(path)
    assert ckpt.neural_rendering_resolution == 64
    assert not marker.exists()


# --- refusals -----------------------------------------------------------------------------------


class _SystemCall:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Eval:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.eval, (f"open({str(self.marker)!r}, 'w').close()",))


class _Popen:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (subprocess.Popen, (["touch", str(self.marker)],))


@pytest.mark.parametrize(
    ("payload", "global_name"),
    [(_SystemCall, f"{os.system.__module__}.system"), (_Eval, "builtins.eval"), (_Popen, "subprocess.Popen")],
)
@pytest.mark.parametrize("where", ["top_level", "inside_G_ema"])
def test_dangerous_global_is_refused_without_side_effect(
    tmp_path: Path, parity, payload, global_name: str, where: str
) -> None:
    state_dict, config = parity
    marker = tmp_path / "payload_ran"
    rendering_kwargs = dict(config["rendering_kwargs"])
    extra = None
    if where == "top_level":
        extra = {"payload": payload(marker)}
    else:
        rendering_kwargs["payload"] = payload(marker)
    path = write_official_pkl(
        tmp_path / "evil.pkl", state_dict, config["init_kwargs"], rendering_kwargs, 128, extra_globals=extra
    )

    with pytest.raises(UnsafeCheckpointError) as info:
        read_official_pkl(path)
    assert f"`{global_name}`" in str(info.value)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


def test_unknown_class_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.pkl"
    path.write_bytes(pickle.dumps({"G_ema": Path("x")}))  # any class outside the allow-list
    with pytest.raises(UnsafeCheckpointError, match="pathlib"):
        read_official_pkl(path)


# --- unusable files -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "is empty"),
        (b"hello, I am not a pickle\n", "not a readable pickle"),
        (random.Random(64).randbytes(64), "not a readable pickle|ends early"),
        (b"PK\x03\x04" + bytes(60), "zip archive"),
        (pickle.dumps({"G": 1, "D": 2}), "has no 'G_ema' network \\(keys: D, G\\)"),
        (pickle.dumps([1, 2, 3]), "got a pickled list"),
        (pickle.dumps({"G_ema": 3}), "'G_ema' is a int"),
    ],
)
def test_unusable_file_is_a_one_line_user_error(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "bad.pkl"
    path.write_bytes(content)
    with pytest.raises(UserInputError, match=match) as info:
        read_official_pkl(path)
    assert "\n" not in str(info.value)


def test_truncated_pickle_is_a_user_error(tmp_path: Path, parity_pkl: Path) -> None:
    data = parity_pkl.read_bytes()
    for cut in (len(data) // 3, len(data) - 1):
        path = tmp_path / f"cut{cut}.pkl"
        path.write_bytes(data[:cut])
        with pytest.raises(UserInputError) as info:
            read_official_pkl(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="no such file"):
        read_official_pkl(tmp_path / "nope.pkl")


# --- shape check --------------------------------------------------------------------------------


def test_check_state_dict_names_first_problem(shared_dir: Path) -> None:
    expected = _key_file_shapes(shared_dir)
    good = {name: torch.empty(shape, device="meta") for name, shape in expected.items()}
    check_state_dict(good, expected)
    assert sum(int(torch.Size(s).numel()) for s in expected.values()) > 30_000_000

    bad = dict(good)
    bad["backbone.synthesis.b8.conv0.weight"] = torch.empty(512, 512, 1, 1, device="meta")
    bad["superresolution.block1.torgb.bias"] = torch.empty(4, device="meta")
    with pytest.raises(UserInputError) as info:
        check_state_dict(bad, expected)
    assert str(info.value) == (
        "weights do not fit the generator: backbone.synthesis.b8.conv0.weight: "
        "got shape (512, 512, 1, 1), expected (512, 512, 3, 3) (and 1 more)"
    )

    missing = dict(good)
    del missing["backbone.mapping.w_avg"]
    with pytest.raises(UserInputError, match=r"missing backbone\.mapping\.w_avg \(expected shape \(512\)\)$"):
        check_state_dict(missing, expected)

    extra = {**good, "decoder.net.4.weight": torch.empty(1, device="meta")}
    with pytest.raises(UserInputError, match=r"unexpected decoder\.net\.4\.weight \(shape \(1\)\)$"):
        check_state_dict(extra, expected)


# --- converted format ---------------------------------------------------------------------------


def test_convert_pkl_writes_pair_atomically_and_loads_equal(tmp_path: Path, parity, parity_pkl: Path) -> None:
    state_dict, config = parity
    out_dir = tmp_path / "cache"
    dst = convert_pkl(parity_pkl, out_dir / "parity.safetensors")

    assert dst == out_dir / "parity.safetensors"
    assert sorted(p.name for p in out_dir.iterdir()) == ["parity.json", "parity.safetensors"]  # no temp files
    base = read_converted_base(dst)
    loaded, saved_config = base.state_dict, base.config
    assert set(loaded) == set(state_dict)
    for name, tensor in state_dict.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    for key in ("init_kwargs", "rendering_kwargs", "class_name"):
        assert saved_config[key] == config[key]
    assert saved_config["neural_rendering_resolution"] == 128
    assert saved_config["source"] == {
        "file": "net.pkl",
        "sha256": hashlib.sha256(parity_pkl.read_bytes()).hexdigest(),
        "network": "G_ema",
    }
    assert read_converted_base(dst.with_suffix(".json")).config == saved_config  # either file names the pair


def test_convert_pkl_refuses_wrong_shapes_and_writes_nothing(
    tmp_path: Path, parity, parity_pkl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state_dict, _ = parity
    expected = _shapes(state_dict)
    expected["decoder.net.2.weight"] = (33, 32)
    monkeypatch.setattr(checkpoint, "expected_shapes", lambda cfg: expected)
    dst = tmp_path / "out" / "x.safetensors"
    with pytest.raises(
        UserInputError, match=r"decoder\.net\.2\.weight: got shape \(33, 64\), expected \(33, 32\)"
    ):
        convert_pkl(parity_pkl, dst)
    assert not dst.parent.exists() or not any(dst.parent.iterdir())


def test_write_converted_base_fp32_and_metadata(tmp_path: Path, parity) -> None:
    state_dict, config = parity
    cfg = {k: config[k] for k in ("init_kwargs", "rendering_kwargs", "class_name")}
    cfg |= {"neural_rendering_resolution": 64, "source": {"sha256": "ab" * 32}}
    dst = write_converted_base(tmp_path / "g.safetensors", ConvertedBase(state_dict, cfg), dtype=torch.float32)
    base = read_converted_base(dst)
    loaded, saved = base.state_dict, base.config
    assert all(t.dtype == torch.float32 for t in loaded.values())
    assert all(torch.equal(loaded[k], v.float()) for k, v in state_dict.items())
    from safetensors import safe_open

    with safe_open(str(dst), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "my3dgen-eg3d" and meta["source_sha256"] == "ab" * 32
    assert meta["class_name"] == "training.triplane.TriPlaneGenerator"
    assert saved["neural_rendering_resolution"] == 64


def test_read_converted_base_refuses_mismatched_pair(tmp_path: Path) -> None:
    cfg = {"init_kwargs": {}, "rendering_kwargs": {}, "neural_rendering_resolution": 64, "class_name": "X"}
    a = write_converted_base(tmp_path / "a.safetensors", ConvertedBase({"w": torch.ones(2)}, cfg))
    b = write_converted_base(tmp_path / "b.safetensors", ConvertedBase({"w": torch.zeros(2)}, cfg))
    b.with_suffix(".json").write_bytes(a.with_suffix(".json").read_bytes())
    with pytest.raises(UserInputError, match="another conversion"):
        read_converted_base(b)
    a.with_suffix(".json").unlink()
    with pytest.raises(UserInputError, match="a.json: no such file"):
        read_converted_base(a)


# --- integration with the generator -------------------------------------------------------------


def test_expected_shapes_match_official_key_list(shared_dir: Path) -> None:
    assert checkpoint.expected_shapes("ffhq512-128") == _key_file_shapes(shared_dir)


def test_convert_parity_pkl_against_real_generator(tmp_path: Path, parity, parity_pkl: Path) -> None:
    dst = convert_pkl(parity_pkl, tmp_path / "parity.safetensors")
    base = read_converted_base(dst)
    state_dict, config = base.state_dict, base.config
    generator = build_generator(config)
    generator.load_state_dict(state_dict, strict=True)


def test_load_generator_from_pkl_and_converted_agree(tmp_path: Path, parity, parity_pkl: Path) -> None:
    state_dict, _ = parity
    from_pkl = checkpoint.load_generator(parity_pkl)
    from_converted = checkpoint.load_generator(convert_pkl(parity_pkl, tmp_path / "p.safetensors"))
    assert not from_pkl.training and from_pkl.neural_rendering_resolution == 128
    for name, tensor in state_dict.items():
        assert torch.equal(from_pkl.state_dict()[name], tensor.float()), name
        assert torch.equal(from_converted.state_dict()[name], tensor.float()), name
