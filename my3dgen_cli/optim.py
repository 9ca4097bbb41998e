"""Adam, the one optimizer my3dgen uses, without torch.optim.

Constructing any `torch.optim` optimizer imports `torch._dynamo` (about 2 s on a 2-core CPU, measured
with cProfile in `my3dgen demo`) in a process that never compiles anything: every `invert`,
`personalize`, `eval` and the demo paid it. This class runs torch.optim.Adam's fused update (one
`torch._fused_adam_` call for all tensors, CPU and CUDA) where torch has it, and otherwise its single-tensor
path in the same operations and order, so results are bitwise those of torch.optim.Adam(fused=True), or of
its default path (tests/test_optim.py); its `state_dict` has torch's layout, so a training checkpoint loads
into either. Only what my3dgen uses: no weight decay, no amsgrad, no maximize.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

# torch.optim.Adam's param-group keys with the values this class implements: a state_dict written here
# loads into torch.optim.Adam and back (and "fused", set per torch version in Adam.defaults, makes torch's
# optimizer continue with the same kernel).
_TORCH_GROUP_KEYS: dict[str, Any] = {"weight_decay": 0, "amsgrad": False, "maximize": False, "foreach": None,
                                     "capturable": False, "differentiable": False, "fused": None,
                                     "decoupled_weight_decay": False}


def _fused(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused Adam kernel takes these tensors: one CPU or CUDA device, one float dtype, real."""
    if not params or not hasattr(torch, "_fused_adam_"):
        return False
    device, dtype = params[0].device, params[0].dtype
    return (device.type in ("cpu", "cuda") and dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)
            and all(p.device == device and p.dtype == dtype and p.grad.dtype == dtype for p in params))


class Adam:
    """Adam(params, lr, betas, eps): params are tensors or groups ({"params": [...], "lr": ...})."""

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        given = list(params)
        if not given:
            raise ValueError("Adam: got no parameters to optimize")
        groups = given if isinstance(given[0], dict) else [{"params": given}]
        self.defaults = {"lr": float(lr), "betas": (float(betas[0]), float(betas[1])), "eps": float(eps),
                         **_TORCH_GROUP_KEYS, "fused": True if hasattr(torch, "_fused_adam_") else None}
        self.param_groups: list[dict[str, Any]] = [{**self.defaults, **g, "params": list(g["params"])}
                                                    for g in groups]
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self._params():
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient: torch's fused Adam, else `_single_tensor_adam` op for op.

        A training step updates ~100 small tensors: seven Python-level ops per tensor cost more than the
        arithmetic (~20 ms per tiny-config step). The fused kernel updates them all in one call (~0.6 ms);
        without it the ops run as `torch._foreach_*` over all tensors that share a step count (on the CPU each
        is the same per-tensor op, so the same bits; ~3.4 ms).
        """
        for group in self.param_groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            live = [p for p in group["params"] if p.grad is not None]
            for p in live:
                if p not in self.state:
                    self.state[p] = {"step": torch.tensor(0.0),
                                     "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                     "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
            steps = [self.state[p]["step"] for p in live]
            if steps:
                torch._foreach_add_(steps, 1)
            if _fused(live):
                torch._fused_adam_(live, [p.grad for p in live], [self.state[p]["exp_avg"] for p in live],
                                   [self.state[p]["exp_avg_sq"] for p in live], [], steps, amsgrad=False, lr=lr,
                                   beta1=beta1, beta2=beta2, weight_decay=0.0, eps=eps, maximize=False)
                continue
            by_step: dict[float, list[torch.Tensor]] = {}
            for p, count in zip(live, torch.stack(steps).tolist() if steps else [], strict=True):
                by_step.setdefault(count, []).append(p)
            for step, params in by_step.items():
                grads = [p.grad for p in params]
                exp_avgs = [self.state[p]["exp_avg"] for p in params]
                exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]
                torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
                torch._foreach_mul_(exp_avg_sqs, beta2)
                torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
                step_size = lr / (1 - beta1**step)
                bias_correction2_sqrt = (1 - beta2**step) ** 0.5
                denom = torch._foreach_sqrt(exp_avg_sqs)
                torch._foreach_div_(denom, bias_correction2_sqrt)
                torch._foreach_add_(denom, eps)
                torch._foreach_addcdiv_(params, exp_avgs, denom, value=-step_size)

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's layout: per-parameter state keyed by position, groups listing positions."""
        index = {p: k for k, p in enumerate(self._params())}
        groups, start = [], 0
        for group in self.param_groups:
            n = len(group["params"])
            settings = {k: v for k, v in group.items() if k != "params"}
            groups.append({**settings, "params": list(range(start, start + n))})
            start += n
        state = {index[p]: {k: v.clone() for k, v in s.items()} for p, s in self.state.items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict from this class or torch.optim.Adam; ValueError (saying what) when it does not fit."""
        saved_groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        saved_state = state_dict.get("state") if isinstance(state_dict, dict) else None
        if not isinstance(saved_groups, list) or not isinstance(saved_state, dict):
            raise ValueError("optimizer state: expected a dict with 'state' and 'param_groups'")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"optimizer state: {len(saved_groups)} parameter groups, "
                             f"expected {len(self.param_groups)}")
        params = self._params()
        for saved, group in zip(saved_groups, self.param_groups, strict=True):
            if not isinstance(saved, dict) or len(saved.get("params", ())) != len(group["params"]):
                raise ValueError("optimizer state: a parameter group of another size")
            for key, default in _TORCH_GROUP_KEYS.items():
                if key in ("weight_decay", "amsgrad", "maximize") and saved.get(key, default) != default:
                    raise ValueError(f"optimizer state: {key}={saved.get(key)!r} is not supported")
        state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        for k, s in saved_state.items():
            if not isinstance(k, int) or not 0 <= k < len(params) or not isinstance(s, dict):
                raise ValueError(f"optimizer state: entry {k!r} does not name a parameter")
            p = params[k]
            moments = [s.get(name) for name in ("exp_avg", "exp_avg_sq")]
            if not all(isinstance(m, torch.Tensor) and m.shape == p.shape for m in moments):
                raise ValueError(f"optimizer state: the moments of parameter {k} do not have its shape "
                                 f"{tuple(p.shape)}")
            step = s.get("step")
            if not isinstance(step, torch.Tensor | int | float):
                raise ValueError(f"optimizer state: parameter {k} has no step count")
            state[p] = {"step": torch.as_tensor(step, dtype=torch.float32).detach().clone().cpu(),
                        "exp_avg": moments[0].detach().to(p.device, p.dtype).clone(),
                        "exp_avg_sq": moments[1].detach().to(p.device, p.dtype).clone()}
        for saved, group in zip(saved_groups, self.param_groups, strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
            group["betas"] = tuple(group["betas"])
        self.state = state
