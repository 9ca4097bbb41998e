"""The written ONNX file: its string properties, fp16 weights, and the check of onnxruntime against PyTorch.

export.export_onnx writes the graph to a temporary file, then `rewrite_model` and `check_onnx`
run on it before it is put in place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from my3dgen_cli.errors import My3DGenError
from my3dgen_cli.use.export import ExportCheck, ExportedGenerator, ExportMismatchError

FP16_MIN_ELEMENTS = 1024  # smaller initializers (biases, filters) stay fp32 under --fp16


def check_onnx(path: str | Path, wrapper: ExportedGenerator, inputs: list[tuple[torch.Tensor, ...]]) -> ExportCheck:
    """onnx.checker on `path`, then onnxruntime (CPU) vs `wrapper` in PyTorch on each input set."""
    import numpy as np
    import onnx

    try:
        import onnxruntime as ort
    except ImportError:
        raise My3DGenError("checking an ONNX export needs onnxruntime: pip install onnxruntime") from None
    onnx.checker.check_model(str(path), full_check=True)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    diffs = dict.fromkeys(wrapper.outputs, 0.0)
    for args in inputs:
        got = session.run(None, {name: t.numpy() for name, t in zip(wrapper.input_names, args, strict=True)})
        with torch.no_grad():
            want = wrapper(*args)
        for name, g, w in zip(wrapper.outputs, got, want, strict=True):
            if g.shape != tuple(w.shape):
                raise ExportMismatchError(f"ONNX output {name}: got shape {list(g.shape)}, expected {list(w.shape)}")
            diffs[name] = max(diffs[name], float(np.abs(g - w.numpy()).max()))
    return ExportCheck(diffs, [int(a[0].shape[0]) for a in inputs], session.get_providers())


def rewrite_model(path: str | Path, fp16: bool, metadata: dict[str, str]) -> None:
    """Add string properties (ORT: `session.get_modelmeta().custom_metadata_map`) and maybe halve weights."""
    import onnx

    model = onnx.load(str(path))
    if fp16:
        halve_initializers(model)
    for key, value in metadata.items():
        if value:
            model.metadata_props.add(key=key, value=str(value))
    onnx.save(model, str(path))


def halve_initializers(model: Any, min_elements: int = FP16_MIN_ELEMENTS) -> None:
    """Store float32 initializers that float16 holds exactly as float16, each behind a Cast to float32.

    The weights were rounded to fp16 before the export, so every raw weight qualifies and the graph
    computes exactly what PyTorch computes with the rounded weights. Constants the exporter folded
    from them (weight x gain, demodulation square sums) are not fp16 values and stay fp32: rounding
    them again was measured at ~9e-4 on the full-size image, too close to the 1e-3 tolerance.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    casts = []
    for init in model.graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            continue
        array = numpy_helper.to_array(init)
        half = array.astype(np.float16)
        if array.size < min_elements or not np.array_equal(half.astype(np.float32), array):
            continue
        name = init.name
        init.CopyFrom(numpy_helper.from_array(half, f"{name}__fp16"))
        casts.append(helper.make_node("Cast", [f"{name}__fp16"], [name], to=TensorProto.FLOAT,
                                      name=f"{name}__to_fp32"))
    nodes = casts + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
