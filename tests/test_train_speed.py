"""The training step's shared work (tiny config, CPU): the symmetry term reuses the main pass's tri-planes.

Reference: the same step with `ops.reference_paths()` open, where the symmetry term renders in a
pass of its own (as before the sharing) and the renderer takes its reference forms.
"""

from __future__ import annotations

import pytest
import torch

from my3dgen_cli.eg3d import ops
from my3dgen_cli.eg3d.camera import lookat_camera, mirror_camera
from my3dgen_cli.lora import adapter_layers
from my3dgen_cli.personalize import training, twin
from my3dgen_cli.personalize.pipeline import PersonalizeConfig
from my3dgen_cli.personalize.symmetry import mirror_pair
from my3dgen_cli.personalize.training import train_adapter
from tests.personalize_helpers import TRAIN_YAWS, fresh, make_person, views

# Float-order noise through Adam with beta1 = 0 (see test_scale_speed.ADAM_ATOL): 1e-4 is 4 % of one step.
ADAM_ATOL = 1e-4

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def person():
    return make_person()


def _count_backbone_latents(G) -> list[int]:
    """Latents the backbone renders, call by call (a forward hook on backbone.synthesis)."""
    seen: list[int] = []
    G.backbone.synthesis.register_forward_hook(lambda module, args, out: seen.append(int(out.shape[0])))
    return seen


def test_mirror_pair_renders_one_backbone_per_latent_and_matches_per_view(person):
    _, w, _ = person
    G = fresh(person)
    ws = w.expand(2, -1, -1)
    cams = lookat_camera(torch.tensor([30.0, -20.0]), 0.0)
    seen = _count_backbone_latents(G)
    with torch.no_grad():
        a, b = mirror_pair(G, ws, cams)
        assert seen == [2]  # the two mirrored views of each latent share its tri-planes
        both = G.synthesis(torch.cat([ws, ws]), torch.cat([cams, mirror_camera(cams)]), noise_mode="const")["image"]
    assert torch.allclose(a, both[:2], atol=1e-5) and torch.allclose(b, both[2:].flip(-1), atol=1e-5)


def _train(person, **kw):
    _, w, hidden = person
    G = fresh(person)
    images, raws, cams = views(hidden, w, TRAIN_YAWS[:4])
    seen = _count_backbone_latents(G)
    config = PersonalizeConfig(steps=3, batch=2, sym=True, sym_every=2, checkpoint_every=0, seed=5, **kw)
    result = train_adapter(G, images, cams, w.expand(4, -1, -1), config, raw_images=raws)
    return G, result, seen


@pytest.mark.parametrize("accum", [1, 2])
def test_symmetry_step_shares_the_main_pass_planes_and_matches_separate_passes(person, accum):
    G_fast, fast, seen_fast = _train(person, accum=accum)
    with ops.reference_paths():
        G_ref, ref, seen_ref = _train(person, accum=accum)
    # Steps 1 and 3 carry the symmetry term: fast = the batch's latents only; reference = + 1 latent.
    assert sum(seen_fast) == 3 * 2 and sum(seen_ref) == 3 * 2 + 2
    assert [set(r) for r in fast.log] == [set(r) for r in ref.log] and "sym" in fast.log[0]
    for a, b in zip(fast.log, ref.log, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a.get("sym", 0.0) == pytest.approx(b.get("sym", 0.0), rel=1e-4, abs=1e-8)
    for a, b in zip(adapter_layers(G_fast).values(), adapter_layers(G_ref).values(), strict=True):
        assert torch.allclose(a.lora_A, b.lora_A, atol=ADAM_ATOL) and torch.allclose(a.lora_B, b.lora_B, atol=ADAM_ATOL)
    assert any(a.lora_B.abs().sum() > 0 for a in adapter_layers(G_fast).values())


@pytest.mark.parametrize("sym", [True, False], ids=["symmetry-step", "plain-step"])
def test_photos_of_a_step_in_parallel_threads_match_one_pass(person, sym):
    """CPU with 2 threads: a plain step's 2 photos render on a thread each (speed.run_parallel); on a symmetry
    step the batch is one task and the symmetry term the other (about equal work). The loss, the symmetry
    term and the gradients equal those of one batched pass to float rounding."""
    calls = []
    real = training.run_parallel
    results = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        G = fresh(person)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(twin.DISABLE_ENV, "0")  # threads (the twin process: test_train_twin.py)
            mp.setattr(training, "run_parallel", lambda tasks: calls.append(len(tasks)) or real(tasks))
            _, w, hidden = person
            images, raws, cams = views(hidden, w, TRAIN_YAWS[:2])
            result = train_adapter(G, images, cams, w.expand(2, -1, -1),
                                   PersonalizeConfig(steps=1, batch=2, checkpoint_every=0, sym=sym), raw_images=raws)
        params = [p for p in G.parameters() if p.grad is not None]  # the step's gradients stay on them
        results[threads] = result.log[0], [p.grad.clone() for p in params]
    assert calls == [2]  # 2 threads: (the batch, the symmetry term) or a task per photo; 1 thread: one pass
    (log1, grads1), (log2, grads2) = results[1], results[2]
    assert ("sym" in log1) == sym
    if sym:
        assert log1["sym"] == pytest.approx(log2["sym"], rel=1e-5)
    assert log1["loss"] == pytest.approx(log2["loss"], rel=1e-6)
    assert len(grads1) == len(grads2) > 0
    for a, b in zip(grads1, grads2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * a.abs().max().item())
