"""my3dgen: personalized, lightweight 3D face priors (LoRA adapters on a frozen EG3D)."""

__version__ = "0.1.0"
