"""Weights I/O: the official pickle reader (restricted unpickler), converted safetensors bases, fingerprints,
and building a generator straight from a file's tensors."""
