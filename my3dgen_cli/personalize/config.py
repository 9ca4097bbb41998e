"""The settings of one personalization (`PersonalizeConfig`) and the part the training loop reads (`TrainConfig`).

`PersonalizeConfig` is what the user chooses (CLI options, library calls) and what the adapter's
metadata records; it checks its values once. `TrainConfig` is built from it (`train_config()`) so
the training loop reads typed fields instead of probing a config object for optional attributes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from my3dgen_cli.errors import UserInputError

# --budget presets: (training steps, anchor projection steps per photo). "paper" = My3DGen's defaults.
BUDGETS = {"quick": (300, 100), "standard": (600, 200), "paper": (1000, 300)}
# Settings a resumed training run may change: they change no number that matters.
NOT_FINGERPRINTED = ("checkpoint_every", "act_checkpointing", "compile", "channels_last", "estimate")


@dataclass(frozen=True)
class TrainConfig:
    """What `training.train_adapter` needs: the adapter, the optimizer, the symmetry term and the speed options.

    fingerprint: the settings a resumed run must share with the checkpoint it continues (defaults to
    this config's own fields less NOT_FINGERPRINTED; PersonalizeConfig passes its wider one, so a
    checkpoint also pins the anchor settings).
    """

    targets: tuple[str, ...]
    rank: int = 1
    alpha: float | None = None
    style: str = "my3dgen"
    train_extras: bool = True
    steps: int = 1000
    batch: int = 2
    lr: float = 0.0025
    betas: tuple[float, float] = (0.0, 0.99)
    sym: bool = True
    sym_every: int = 4
    sym_weight: float = 1.0
    sym_yaw: float = 35.0
    seed: int = 0
    checkpoint_every: int = 100
    amp: bool | str = False
    accum: int = 1
    act_checkpointing: bool = False
    compile: bool = False
    channels_last: bool | None = None
    fingerprint: dict[str, Any] = field(default_factory=dict, compare=False)

    def resume_fingerprint(self) -> dict[str, Any]:
        if self.fingerprint:
            return dict(self.fingerprint)
        d = asdict(self)
        d.pop("fingerprint")
        d["targets"], d["betas"] = list(self.targets), list(self.betas)
        for key in NOT_FINGERPRINTED:
            d.pop(key, None)  # "estimate" is PersonalizeConfig's alone
        return d


@dataclass(frozen=True)
class PersonalizeConfig:
    """Settings of one personalization; saved in the adapter's metadata. Paper defaults."""

    rank: int = 1
    alpha: float | None = None  # None = rank (scale 1)
    style: str = "my3dgen"
    include_mapping: bool = False
    include_decoder: bool = False
    train_extras: bool = True  # also train My3DGen's extras: b4.const, biases, noise strengths (lora.EXTRA_TARGETS)
    steps: int = 1000
    batch: int = 2
    lr: float = 0.0025
    betas: tuple[float, float] = (0.0, 0.99)
    sym: bool = True
    sym_loss: str = "id"
    sym_every: int = 4
    sym_weight: float = 1.0
    sym_yaw: float = 35.0  # degrees; symmetry views are drawn from [-sym_yaw, sym_yaw]
    anchor_steps: int = 300
    anchor_space: str = "w"
    anchor_lr: float = 0.01
    anchor_batch: int = 4  # photos projected together (and saved together for --resume)
    mirror: bool = False
    seed: int = 0
    checkpoint_every: int = 100
    amp: bool | str = False  # False/"off", True/"bf16", "fp16" (CUDA): speed.autocast
    accum: int = 1  # micro-batches per step (same effective batch, less memory)
    act_checkpointing: bool = False  # recompute activations in backward (less memory, ~1/3 more time)
    compile: bool = False  # torch.compile the generator's synthesis
    channels_last: bool | None = None  # NHWC convolutions; None = with autocast on CUDA (speed.use_channels_last)
    estimate: bool = True  # time a few steps first and report the run's duration (personalize(estimate=True) asks)

    def __post_init__(self) -> None:
        from my3dgen_cli.lora import CONV_STYLES
        from my3dgen_cli.personalize.anchors import SPACES
        from my3dgen_cli.personalize.symmetry import SYM_LOSSES
        from my3dgen_cli.speed import AMP_MODES

        if not isinstance(self.estimate, bool):
            raise UserInputError(f"estimate: got {self.estimate!r}, expected True or False")
        if not isinstance(self.amp, bool) and self.amp not in AMP_MODES:
            raise UserInputError(f"amp: got {self.amp!r}, expected a bool or one of {', '.join(AMP_MODES)}")
        for name, least in (("rank", 1), ("steps", 1), ("batch", 1), ("anchor_steps", 0), ("accum", 1),
                            ("anchor_batch", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < least:
                raise UserInputError(f"{name}: got {value!r}, expected an integer >= {least}")
        if self.alpha is not None and self.alpha <= 0:
            raise UserInputError(f"alpha: got {self.alpha}, expected > 0")
        if not self.lr > 0 or not self.anchor_lr > 0:
            raise UserInputError(f"lr: got {self.lr} (anchor {self.anchor_lr}), expected > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise UserInputError(f"betas: got {self.betas}, expected two values in [0, 1)")
        if self.sym_loss not in SYM_LOSSES:
            raise UserInputError(f"sym_loss: got {self.sym_loss!r}, expected one of {', '.join(SYM_LOSSES)}")
        if self.sym_every < 1 or self.checkpoint_every < 0:
            raise UserInputError(f"sym_every / checkpoint_every: got {self.sym_every} / {self.checkpoint_every}, "
                                 "expected >= 1 / >= 0")
        if not 0 < self.sym_yaw <= 90:
            raise UserInputError(f"sym_yaw: got {self.sym_yaw}, expected degrees in (0, 90]")
        if self.anchor_space not in SPACES:
            raise UserInputError(f"anchor_space: got {self.anchor_space!r}, expected one of {', '.join(SPACES)}")
        if self.style not in CONV_STYLES:
            raise UserInputError(f"style: got {self.style!r}, expected one of {', '.join(CONV_STYLES)}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

    def targets(self) -> tuple[str, ...]:
        from my3dgen_cli.lora import DECODER_TARGETS, DEFAULT_TARGETS, MAPPING_TARGETS

        return DEFAULT_TARGETS + (MAPPING_TARGETS if self.include_mapping else ()) + (
            DECODER_TARGETS if self.include_decoder else ())

    def train_config(self) -> TrainConfig:
        """The training loop's settings; its checkpoint fingerprint is `train_fingerprint()`."""
        own = ("targets", "fingerprint")
        shared = {f.name: getattr(self, f.name) for f in fields(TrainConfig) if f.name not in own}
        return TrainConfig(targets=self.targets(), fingerprint=self.train_fingerprint(), **shared)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PersonalizeConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if k == "betas" else v) for k, v in data.items() if k in known})

    def train_fingerprint(self) -> dict[str, Any]:
        """Settings a resumed run must share with the interrupted one (all but checkpoint_every, the
        estimate and the exact speed options: activation checkpointing, compile and channels_last change
        no number that matters)."""
        d = self.to_dict()
        for key in NOT_FINGERPRINTED:
            d.pop(key)
        return d
