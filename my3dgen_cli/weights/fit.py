"""Does a file's generator fit? Its tensors against the generator's names and shapes, its config against a
named one (`check_config`: a zoo entry says which config its file must hold)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from my3dgen_cli.errors import UserInputError
from my3dgen_cli.weights.instantiate import skeleton


def expected_shapes(config: str | dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Official names -> shapes of the generator `build_generator(config)` builds (without its
    random init: no cost)."""
    return {name: tuple(t.shape) for name, t in generator_of(config).state_dict().items()}


def generator_of(config: str | dict[str, Any]) -> torch.nn.Module:
    """`skeleton(config)`; a config this generator cannot build is the file's fault (UserInputError)."""
    try:
        return skeleton(config)
    except (ValueError, KeyError, TypeError) as err:
        raise UserInputError(f"its config cannot be built: {type(err).__name__}: {err}") from None


def check_state_dict(state_dict: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    """Raise `UserInputError` naming the first missing key, shape mismatch or unexpected key.

    Keys are compared in the order of `expected` (the generator's module order), then the leftovers.
    """
    problems: list[str] = []
    for name, shape in expected.items():
        if name not in state_dict:
            problems.append(f"missing {name} (expected shape {_shape(shape)})")
        elif tuple(state_dict[name].shape) != tuple(shape):
            problems.append(f"{name}: got shape {_shape(state_dict[name].shape)}, expected {_shape(shape)}")
    problems += [
        f"unexpected {name} (shape {_shape(t.shape)})"
        for name, t in state_dict.items()
        if name not in expected
    ]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserInputError(f"weights do not fit the generator: {problems[0]}{more}")


def _shape(shape: Any) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


# --- configs ------------------------------------------------------------------------------------

# rendering_kwargs that only the official loss reads (pose-conditioning swap, density regularisation):
# two files that differ only there hold the same generator. Everything else is compared.
_TRAINING_ONLY = frozenset({"gpc_reg_prob", "density_reg", "density_reg_p_dist", "reg_type"})
_ABSENT = object()


class ConfigMismatchError(UserInputError):
    """A file holds a generator of another config than the one it is imported as."""


def config_differences(found: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """`key: file value vs expected value` for every generator setting of `expected` that `found`
    sets otherwise (init kwargs, rendering kwargs, neural rendering resolution).

    Keys only `found` has are not compared (the generator reads only what `expected` names), nor
    are `_TRAINING_ONLY` rendering kwargs.
    """
    diffs: list[str] = []
    for section in ("init_kwargs", "rendering_kwargs"):
        got = found.get(section) or {}
        want = {k: v for k, v in (expected.get(section) or {}).items() if k != "rendering_kwargs"}
        _diff_dicts(got, want, section, diffs)
    got_nrr, want_nrr = found.get("neural_rendering_resolution"), expected.get("neural_rendering_resolution")
    if not _same(got_nrr, want_nrr):
        diffs.append(f"neural_rendering_resolution: {got_nrr!r} vs {want_nrr!r}")
    return diffs


def _diff_dicts(got: Any, want: dict[str, Any], where: str, diffs: list[str]) -> None:
    for key, value in want.items():
        if key in _TRAINING_ONLY:
            continue
        other = got.get(key, _ABSENT) if isinstance(got, dict) else _ABSENT
        if isinstance(value, dict) and isinstance(other, dict):
            _diff_dicts(other, value, f"{where}.{key}", diffs)
        elif not _same(other, value):
            shown = "missing" if other is _ABSENT else repr(other)
            diffs.append(f"{where}.{key}: {shown} vs {value!r}")


def _same(a: Any, b: Any) -> bool:
    """Equal as config values: 1 == 1.0, [0, 0, 0.2] == (0, 0, 0.2); a bool is never a number."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b if type(a) is type(b) or {type(a), type(b)} <= {int, float} else False


def config_names(config: dict[str, Any]) -> list[str]:
    """The named configs (`configs.NAMED_CONFIGS`) that `config` matches: how to call a file's config."""
    from my3dgen_cli.eg3d.configs import NAMED_CONFIGS

    return [name for name, make in NAMED_CONFIGS.items() if not config_differences(config, make())]


def check_config(config: dict[str, Any], expected: str, src: str | Path) -> None:
    """Raise `ConfigMismatchError` (one line, both configs named, the differing keys) unless the
    config found in `src` is the named config `expected`."""
    from my3dgen_cli.eg3d.configs import resolve_config

    try:
        want = resolve_config(expected).to_dict()
    except ValueError as err:
        raise UserInputError(f"{src}: {err}") from None
    diffs = config_differences(config, want)
    if diffs:
        names = config_names(config)
        found = " / ".join(names) if names else "an unnamed config"
        more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise ConfigMismatchError(
            f"{src}: holds a generator of {found}, not {expected}: "
            f"{'; '.join(diffs[:3])}{more} (file vs {expected})"
        )
