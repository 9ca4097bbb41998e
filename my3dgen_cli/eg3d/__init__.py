"""EG3D in plain PyTorch, with the official module names so official weights load strictly."""
