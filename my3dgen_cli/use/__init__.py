"""What an identity is for: invert, render, interpolate, export, meshes, evaluation."""
