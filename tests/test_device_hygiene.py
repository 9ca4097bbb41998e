"""GPU paths checked without a GPU: device mixing, host syncs, device selection, fp16 autocast.

- Device mixing: models on the `meta` device under `DeviceAudit` (tests/device_checks.py), which
  fails any op whose tensors sit on two devices, as CUDA does; and on FakeTensor "cuda:0" for the
  CUDA-only branches (fp16/bf16 CUDA autocast).
- Host syncs: synthesis and the renderer loop run with syncs forbidden; training, inversion and
  render_views are allowed the ones their docstrings state (one per step, one copy at the end).
- Device selection: `--device` and torchrun's LOCAL_RANK with a monkeypatched torch.cuda.
- fp16: CPU float16 autocast of the whole synthesis against fp32 on the tiny config.
"""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from my3dgen_cli.devices import pick_device
from my3dgen_cli.eg3d import build_generator
from my3dgen_cli.eg3d import renderer as renderer_module
from my3dgen_cli.eg3d.camera import camera_angles, frontal_camera, lookat_camera, mirror_camera
from my3dgen_cli.errors import UserInputError
from my3dgen_cli.lora import adapter_layers, add_adapters
from my3dgen_cli.personalize import distributed as D
from tests.device_checks import DeviceAudit, DeviceMixError, HostSyncError, fake_cuda

META = torch.device("meta")
# CPU float16 autocast of the tiny synthesis vs fp32 (measured: image max 0.0044, mean 0.0009 on
# values up to ~2; raw max 0.0012; depth max 0.0004 scene units). fp16 keeps 11 mantissa bits.
FP16_IMAGE_ATOL, FP16_IMAGE_MEAN_ATOL, FP16_DEPTH_ATOL = 0.02, 0.003, 0.005


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(adapter: bool = True, device: torch.device | str = META) -> torch.nn.Module:
    """The tiny generator (with a rank-1 adapter whose B is non-zero) moved to `device`."""
    torch.manual_seed(0)
    G = build_generator("tiny")
    if adapter:
        add_adapters(G, rank=1, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for a in adapter_layers(G).values():
                a.lora_B.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(1))
    return G.to(device).eval()


def _inputs(G: torch.nn.Module, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    ws = torch.randn(n, G.num_ws, G.w_dim, device=device)
    cams = lookat_camera(torch.linspace(-30.0, 30.0, n), 5.0).to(device)  # camera helpers: tested apart
    return ws, cams


# --- 1. device mixing -------------------------------------------------------------------------


def test_the_audit_catches_a_cpu_tensor_inside_the_renderer(monkeypatch):
    """The check can fail: coarse depths made on the CPU (a linspace without device=) are caught."""
    G = _tiny()
    ws, cams = _inputs(G, 2, META)
    real = renderer_module.coarse_depths
    monkeypatch.setattr(renderer_module, "coarse_depths",
                        lambda n, m, s, e, k, mode, device, gen=None: real(n, m, s, e, k, mode, torch.device("cpu")))
    with DeviceAudit(), pytest.raises(DeviceMixError, match="cpu, meta") as err, torch.no_grad():
        G.synthesis(ws, cams)
    assert "renderer.py" in str(err.value)  # names our line, not torch's
    # ...and a module-level CPU constant meeting a device tensor (what mirror_camera had):
    with DeviceAudit(), pytest.raises(DeviceMixError, match="mm"):
        torch.eye(4) @ torch.ones(4, 4, device=META)


def test_full_synthesis_on_meta_mixes_no_devices_and_never_syncs():
    """Mapping + backbone + tri-plane renderer + superresolution, every mode a user can pick."""
    G = _tiny()
    ws, cams = _inputs(G, 2, META)
    with DeviceAudit(forbid_syncs=True), torch.no_grad():
        w = G.mapping(torch.randn(2, G.z_dim, device=META), frontal_camera(2).to(META), truncation_psi=0.7)
        assert w.device == META and w.shape == (2, G.num_ws, G.w_dim)
        for training in (False, True):  # fused (eval) and unfused (training) modulated convs
            G.train(training)
            for sampling, noise in (("deterministic", "const"), ("stochastic", "random"), ("deterministic", "none")):
                out = G.synthesis(ws, cams, sampling=sampling, noise_mode=noise)
                assert {k: (v.device, tuple(v.shape)) for k, v in out.items()} == {
                    "image": (META, (2, 3, 64, 64)), "image_raw": (META, (2, 3, 32, 32)),
                    "image_depth": (META, (2, 1, 32, 32)), "image_features": (META, (2, 16, 32, 32))}
        sigma = G.sample_density(ws[:1], torch.zeros(1, 10, 3, device=META))
        assert sigma.device == META


def test_camera_helpers_follow_the_device_of_their_inputs():
    yaw = torch.tensor([-30.0, 0.0, 20.0], device=META)
    with DeviceAudit(forbid_syncs=True):
        for cams in (lookat_camera(yaw, 10.0), lookat_camera(0.0, yaw), lookat_camera(yaw, yaw)):
            assert cams.device == META and cams.shape == (3, 25)
        assert mirror_camera(cams).device == META
        assert all(t.device == META for t in camera_angles(cams))
    assert lookat_camera(20.0, 5.0).device.type == "cpu"  # plain numbers still give CPU labels
    # The same numbers as before the device fix (CPU tensors and floats agree exactly).
    assert torch.equal(lookat_camera(torch.tensor([20.0]), torch.tensor([5.0])), lookat_camera(20.0, 5.0))


def test_lora_forward_and_backward_on_meta():
    G = _tiny()
    ws, cams = _inputs(G, 2, META)
    G.train()
    with DeviceAudit(forbid_syncs=True):
        out = G.synthesis(ws, cams)
        (out["image"].square().mean() + out["image_raw"].square().mean()).backward()
    adapters = list(adapter_layers(G).values())
    assert adapters and all(a.lora_A.grad is not None and a.lora_A.grad.device == META for a in adapters)
    assert all(p.grad is None for n, p in G.named_parameters() if "lora_" not in n)  # the base stays frozen


def test_personalization_on_meta_syncs_once_per_step(tmp_path):
    """The whole personalize(): anchors, training with LPIPS-alex and the ArcFace symmetry term, files."""
    from my3dgen_cli.losses.arcface import build_arcface
    from my3dgen_cli.losses.perceptual import build_lpips
    from my3dgen_cli.personalize.pipeline import LossNets, PersonalizeConfig, personalize
    from tests.personalize_helpers import TRAIN_YAWS, make_person, write_photos

    person = make_person()
    photos = write_photos(person, tmp_path / "photos", TRAIN_YAWS[:3])
    with torch.device("meta"):  # built straight on meta: no seconds of random initialization
        alex = build_lpips("alex")  # (VGG for the anchors runs the same LPIPS code, only slower)
        nets = LossNets(alex, alex, build_arcface(None))
    steps, anchor_steps = 2, 2
    config = PersonalizeConfig(steps=steps, anchor_steps=anchor_steps, batch=2, sym_every=2, checkpoint_every=0)
    audit = DeviceAudit()
    with audit:
        result = personalize(photos, "on-meta", config, generator=_tiny(adapter=False, device="cpu"),
                             device="meta", nets=nets)
    assert result.steps == steps and result.sym_loss == "id" and result.folder.joinpath("adapter.safetensors").is_file()
    in_training = [s for s in audit.syncs if "training.py" in s]
    assert len(in_training) == steps and all(".tolist()" in s for s in in_training), in_training
    # Anchor projection reads its loss for the progress bar once per step (3 photos = 1 chunk).
    in_anchors = [s for s in audit.syncs if "anchors.py" in s]
    assert len(in_anchors) == anchor_steps and all("on_step" in s for s in in_anchors), in_anchors
    # Every other sync writes a file (anchors, adapter, previews) or hashes the base weights.
    others = {s.rsplit(" at ", 1)[1].split(":")[0] for s in audit.syncs if s not in in_training + in_anchors}
    assert others <= {"my3dgen_cli/identity.py", "my3dgen_cli/lora.py", "my3dgen_cli/personalize/reports.py",
                      "my3dgen_cli/tagged_files.py", "my3dgen_cli/weights/fingerprint.py"}, others


def test_one_training_step_on_meta():
    from my3dgen_cli.personalize.pipeline import PersonalizeConfig
    from my3dgen_cli.personalize.training import train_adapter

    G = _tiny(adapter=False)
    ws, cams = _inputs(G, 3, META)
    images = torch.zeros(3, 3, 64, 64, device=META)
    config = PersonalizeConfig(steps=1, batch=3, sym=True, sym_every=1, checkpoint_every=0, accum=2,
                               act_checkpointing=True)
    audit = DeviceAudit()
    with audit:
        result = train_adapter(G, images, cams, ws, config)
    assert result.steps == 1 and len(audit.syncs) == 1, audit.syncs  # the logged losses, in one transfer


def test_inversion_on_meta():
    """Anchor projection never syncs; invert_image reads its loss once per step (the progress log)."""
    from my3dgen_cli.personalize.anchors import project_to_w
    from my3dgen_cli.use.invert import InvertConfig, invert_image
    from my3dgen_cli.use.pti import tune_adapter

    G = _tiny()
    anchors, cams = _inputs(G, 3, META)
    target = torch.zeros(1, 3, 64, 64, device=META)
    with DeviceAudit(forbid_syncs=True):
        ws = project_to_w(G, target.expand(3, -1, -1, -1), cams, steps=2, space="w+")
    assert ws.device == META and ws.shape == anchors.shape
    steps = 2
    for config in (InvertConfig(steps=steps, refine_camera=True, init="nearest"),
                   InvertConfig(steps=steps, space="w", hull=True)):
        audit = DeviceAudit()
        with audit:
            result = invert_image(G, target, cams[:1], anchors=anchors, config=config)
        assert result.ws.device == META and result.camera.device == META
        in_loop = [s for s in audit.syncs if "losses.append" in s]
        assert len(in_loop) == steps, audit.syncs
    with DeviceAudit():
        tune_adapter(G, ws[:1], cams[:1], target, steps=1)


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_render_views_copies_to_the_host_once_whatever_the_batch(batch):
    from my3dgen_cli.use.render import latent_from_seed, render_views

    G = _tiny()
    audit = DeviceAudit()
    with audit:
        ws = latent_from_seed(G, 3)
        views = render_views(G, ws, lookat_camera(torch.linspace(-20, 20, 5), 0.0).to(META), batch=batch)
    assert views.images.shape == (5, 3, 64, 64) and views.images.device.type == "cpu"
    assert len(audit.syncs) == 3 and all("render.py" in s for s in audit.syncs)  # images, depth, cameras


def test_evaluation_metrics_on_meta():
    """evaluate's consistency fed render_views' host images to the loss networks on the device."""
    from my3dgen_cli.losses.arcface import build_arcface
    from my3dgen_cli.losses.perceptual import build_lpips
    from my3dgen_cli.use.evaluate import consistency, score

    G = _tiny()
    with torch.device("meta"):
        lpips, arcface = build_lpips("alex"), build_arcface(None)
    lpips.to(META)  # (lpips makes its scaling constants with torch.Tensor(), on the CPU)
    ws, _ = _inputs(G, 1, META)
    image = torch.zeros(1, 3, 64, 64, device=META)
    with DeviceAudit():
        row = score(image, image, lpips, arcface)
        cons = consistency(G, ws, lpips, arcface)
    assert set(row) == {"psnr", "ssim", "lpips", "id"} and cons["mirror_lpips"] is not None


def test_synthesis_runs_on_fake_cuda_and_autocast_reaches_the_superresolution(monkeypatch):
    """FakeTensors on cuda:0: the CUDA branches (autocast on CUDA) run with CUDA's device and dtype rules."""
    from my3dgen_cli.use.render import render_views

    G = _tiny(device="cpu")
    seen: list[torch.dtype] = []
    G.superresolution.block1.conv1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with fake_cuda(G) as cuda, torch.no_grad():
        ws, cams = _inputs(G, 3, cuda)
        assert cams.device == cuda and next(G.parameters()).device == cuda
        out = G.synthesis(ws, cams)
        assert out["image"].device == cuda and seen == [torch.float32]
        # torch.autocast("cuda") asks the driver whether CUDA (and bf16) is there: say yes.
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        for amp, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
            seen.clear()
            views = render_views(G, ws[:1], cams, batch=2, amp=amp)
            assert seen == [dtype, dtype] and views.images.dtype == torch.float32  # 2 passes of batch 2
    assert next(G.parameters()).device.type == "cpu"  # the real weights are back


# --- 2. host syncs on real CPU tensors --------------------------------------------------------


def test_synthesis_has_no_host_sync_op_on_cpu():
    """The same audit on real CPU tensors, counting CPU ops too: no .item(), nonzero, bool-mask index."""
    G = _tiny(device="cpu")
    ws, cams = _inputs(G, 2, torch.device("cpu"))
    with DeviceAudit(forbid_syncs=True, cpu_too=True), torch.no_grad():
        for training in (False, True):
            G.train(training)
            G.synthesis(ws, cams, sampling="stochastic", noise_mode="random")
    x = torch.tensor([1.0, -2.0])
    for sync in (lambda: x.sum().item(), lambda: bool(x[0] > 0), lambda: x.nonzero(), lambda: x[x > 0],
                 lambda: torch.masked_select(x, x > 0), lambda: int(x[0])):
        with DeviceAudit(forbid_syncs=True, cpu_too=True), pytest.raises(HostSyncError):
            sync()


# --- 3. device selection ----------------------------------------------------------------------


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this machine has `n` GPUs (and no MPS)."""
    def set_gpus(n: int, mps: bool = False) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)

    # pick_device("cuda") turns TF32 off process-wide: restore torch's flags after the test.
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    yield set_gpus
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def test_cuda_means_exact_fp32_unless_tf32_is_asked_for(gpus, monkeypatch):
    """Parity with the published model on a GPU needs fp32 convolutions, not cuDNN's default TF32."""
    gpus(1)
    monkeypatch.delenv("MY3DGEN_TF32", raising=False)
    torch.backends.cudnn.allow_tf32 = True
    pick_device("cpu")
    assert torch.backends.cudnn.allow_tf32  # a CPU run leaves torch's flags alone
    pick_device("auto")
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    monkeypatch.setenv("MY3DGEN_TF32", "1")
    pick_device("cuda")
    assert torch.backends.cudnn.allow_tf32


def test_pick_device(gpus):
    gpus(2)
    assert pick_device("auto") == torch.device("cuda") and pick_device("cuda:1") == torch.device("cuda", 1)
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(UserInputError, match="got GPU 2, but this machine shows 2"):
        pick_device("cuda:2")
    for bad in ("cuda:x", "gpu", "cuda:-1"):
        with pytest.raises(UserInputError, match="--device: got"):
            pick_device(bad)
    gpus(0, mps=True)
    assert pick_device("auto") == torch.device("mps")
    with pytest.raises(UserInputError, match="CUDA is not available"):
        pick_device("cuda")
    gpus(0)
    assert pick_device("auto") == torch.device("cpu")
    with pytest.raises(UserInputError, match="MPS is not available"):
        pick_device("mps")


def test_torchrun_puts_each_rank_on_its_own_gpu(gpus, monkeypatch):
    gpus(4)
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    d = D.from_env()
    assert (d.rank, d.world, d.local_rank) == (5, 8, 1) and D.launched()
    assert D.device_for(d, pick_device("cuda")) == torch.device("cuda", 1)
    assert D.device_for(d, torch.device("cpu")) == torch.device("cpu")
    assert D.device_for(D.SINGLE, torch.device("cuda")) == torch.device("cuda")  # one process: as given
    with pytest.raises(UserInputError, match="every rank would use that one GPU"):
        D.device_for(d, torch.device("cuda", 0))
    with pytest.raises(UserInputError, match="LOCAL_RANK 5"):
        D.device_for(D.Dist(5, 8, 5), torch.device("cuda"))


def test_process_group_backend_follows_the_device(monkeypatch):
    calls: list[tuple] = []
    monkeypatch.setattr(D.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(D.dist, "init_process_group", lambda backend, **kw: calls.append((backend, kw["rank"])))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    D.init_group(D.Dist(1, 2, 1), torch.device("cuda", 1))
    D.init_group(D.Dist(0, 2, 0), torch.device("cpu"))
    D.init_group(D.SINGLE, torch.device("cuda"))  # world 1: no group at all
    assert calls == [("set_device", torch.device("cuda", 1)), ("nccl", 1), ("gloo", 0)]


def test_cli_refuses_gpu_only_settings_in_one_line(gpus, monkeypatch, tmp_path):
    from my3dgen_cli.cli import app

    runner = CliRunner()
    gpus(0)
    result = runner.invoke(app, ["personalize", str(tmp_path), "--name", "x", "--amp", "fp16", "--device", "cpu"])
    assert result.exit_code == 2 and "--amp fp16: needs CUDA" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    gpus(1)  # torchrun with 2 ranks per machine on a 1-GPU machine: rank 1 has no GPU
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    result = runner.invoke(app, ["personalize", str(tmp_path), "--name", "x", "--device", "cuda"])
    assert result.exit_code == 2 and "got GPU 1, but this machine shows 1" in result.output
    from my3dgen_cli.speed import autocast

    with pytest.raises(UserInputError, match="fp16"):
        autocast(torch.device("cpu"), "fp16")


# --- 4. fp16 autocast -------------------------------------------------------------------------


def test_fp16_autocast_synthesis_stays_close_to_fp32():
    """CPU float16 autocast of the whole synthesis (the CUDA fp16 path's dtype handling) vs fp32."""
    G = _tiny(device="cpu")
    ws, cams = _inputs(G, 3, torch.device("cpu"))
    seen: list[torch.dtype] = []
    G.superresolution.block0.conv1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.no_grad():
        ref = G.synthesis(ws, cams)
        with torch.autocast("cpu", dtype=torch.float16):
            half = G.synthesis(ws, cams)
    assert seen == [torch.float32, torch.float16]  # autocast did reach the superresolution convs
    diff = (half["image"].float() - ref["image"]).abs()
    assert half["image"].dtype == torch.float32 and torch.isfinite(half["image"]).all()
    assert 0 < float(diff.max()) < FP16_IMAGE_ATOL and float(diff.mean()) < FP16_IMAGE_MEAN_ATOL, float(diff.max())
    assert float((half["image_raw"].float() - ref["image_raw"]).abs().max()) < FP16_IMAGE_ATOL
    assert float((half["image_depth"].float() - ref["image_depth"]).abs().max()) < FP16_DEPTH_ATOL


def test_fp16_training_scales_the_loss_so_small_gradients_survive(monkeypatch, tmp_path):
    """fp16 flushes gradients below ~6e-8 to zero; at 512 px the per-pixel MSE gradient is about that.

    Emulated on the tiny config with photos 1e-3 away from the renders (gradients ~4e-8): CPU
    float16 autocast stands in for CUDA's. Without the loss scale 83 % of the adapter's B entries
    got exactly zero gradient and never moved (measured); with it every entry moves, as in fp32.
    """
    import contextlib

    from my3dgen_cli.personalize import checkpoints, training
    from my3dgen_cli.personalize.pipeline import PersonalizeConfig
    from tests.personalize_helpers import TRAIN_YAWS, fresh, make_person, views

    person = make_person()
    images, raws, cams = views(fresh(person), person[1], TRAIN_YAWS[:4])
    g = torch.Generator().manual_seed(3)
    images = images + 1e-3 * torch.randn(images.shape, generator=g)
    raws = raws + 1e-3 * torch.randn(raws.shape, generator=g)
    monkeypatch.setattr(training, "autocast", lambda device, amp: torch.autocast("cpu", dtype=torch.float16)
                        if amp == "fp16" else contextlib.nullcontext())

    def moved(amp: str) -> float:
        G = fresh(person)
        config = PersonalizeConfig(steps=2, batch=4, sym=False, checkpoint_every=1, seed=5, amp=amp)
        training.train_adapter(G, images, cams, person[1].expand(4, -1, -1), config, raw_images=raws,
                               checkpoint_dir=tmp_path / amp)
        b = torch.cat([a.lora_B.flatten() for a in adapter_layers(G).values()])
        return float((b != 0).float().mean())

    assert moved("off") > 0.99 and moved("fp16") > 0.99
    state = torch.load(checkpoints.checkpoint_files(tmp_path / "fp16")[-1], weights_only=True)
    assert state["scaler"]["scale"] > 1  # the loss scale is kept for --resume
    assert "scaler" not in torch.load(checkpoints.checkpoint_files(tmp_path / "off")[-1], weights_only=True)
