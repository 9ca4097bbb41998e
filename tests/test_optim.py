"""my3dgen's Adam: bitwise torch.optim.Adam(fused=True) on the CPU (and its default path where a fused kernel is
missing), checkpoints that move between the two, clear refusals."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from my3dgen_cli.optim import Adam


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(5, 3, generator=g)), torch.nn.Parameter(torch.randn(7, generator=g))]


def _run(opt_cls: type, params: list[torch.nn.Parameter], steps: int, start: int = 0) -> None:
    opt = opt_cls([{"params": params[:1], "lr": 0.05}, {"params": params[1:], "lr": 0.01}], betas=(0.9, 0.99))
    _steps(opt, params, start, steps)


def _steps(opt: object, params: list[torch.nn.Parameter], start: int, stop: int) -> None:
    for step in range(start, stop):
        for group in opt.param_groups:  # a schedule, as invert and the anchors use
            group["lr"] = group["lr"] * 0.97
        loss = sum(((p - 0.1 * step) ** 2).sum() * (k + 1) for k, p in enumerate(params))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _torch_adam(*args: object, **kwargs: object) -> torch.optim.Adam:
    return torch.optim.Adam(*args, fused=True, **kwargs)


def test_updates_are_bitwise_torch_adam() -> None:
    ours, theirs = _params(0), _params(0)
    _run(Adam, ours, 25)
    _run(_torch_adam, theirs, 25)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


def test_without_the_fused_kernel_updates_are_bitwise_torch_default_adam(monkeypatch) -> None:
    from my3dgen_cli import optim

    monkeypatch.setattr(optim, "_fused", lambda params: False)
    ours, theirs = _params(0), _params(0)
    _run(Adam, ours, 25)
    _run(torch.optim.Adam, theirs, 25)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("direction", ["torch->ours", "ours->torch"])
def test_state_dicts_move_between_the_two(direction: str) -> None:
    """A run resumed from the other class's state_dict continues exactly as an unbroken run."""
    first_cls, second_cls = (_torch_adam, Adam) if direction == "torch->ours" else (Adam, _torch_adam)
    whole = _params(1)
    opt = Adam([{"params": whole[:1], "lr": 0.05}, {"params": whole[1:], "lr": 0.01}], betas=(0.9, 0.99))
    _steps(opt, whole, 0, 20)

    half = _params(1)
    first = first_cls([{"params": half[:1], "lr": 0.05}, {"params": half[1:], "lr": 0.01}], betas=(0.9, 0.99))
    _steps(first, half, 0, 10)
    saved = first.state_dict()
    second = second_cls([{"params": half[:1], "lr": 1.0}, {"params": half[1:], "lr": 1.0}], betas=(0.9, 0.99))
    second.load_state_dict(saved)
    _steps(second, half, 10, 20)
    for a, b in zip(whole, half, strict=True):
        assert torch.equal(a, b)


def test_parameters_without_gradients_are_left_alone() -> None:
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = Adam([a, b], lr=0.1)
    (a * 2).sum().backward()
    opt.step()
    assert not torch.equal(a, torch.ones(3)) and torch.equal(b, torch.ones(3))
    assert b not in opt.state


@pytest.mark.parametrize("bad, message", [
    ({"state": {}, "param_groups": []}, "parameter groups"),
    ({"param_groups": [{"params": [0, 1]}]}, "expected a dict"),
    ({"state": {}, "param_groups": [{"params": [0]}]}, "another size"),
    ({"state": {5: {}}, "param_groups": [{"params": [0, 1]}]}, "does not name a parameter"),
    ({"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(3)}},
      "param_groups": [{"params": [0, 1]}]}, "do not have its shape"),
    ({"state": {}, "param_groups": [{"params": [0, 1], "amsgrad": True}]}, "amsgrad"),
])
def test_a_state_dict_that_does_not_fit_is_refused(bad: dict, message: str) -> None:
    opt = Adam([torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(bad)


def test_no_parameters_is_refused() -> None:
    with pytest.raises(ValueError, match="no parameters"):
        Adam([])


def test_training_does_not_import_dynamo() -> None:
    """The reason this class exists: a step of Adam leaves torch._dynamo unimported (2 s on a small CPU)."""
    code = ("import sys, torch\nfrom my3dgen_cli.optim import Adam\np = torch.nn.Parameter(torch.ones(2))\n"
            "opt = Adam([p]); p.sum().backward(); opt.step()\nprint('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
