"""Run an onnx-ir model in ONNX Runtime (CPU, ORT's own graph optimizations off).

Weights in external data are never copied into a protobuf. ORT memory-maps them itself when
it loads a model from a path, so the graph (without those weights) is written to a temporary
file beside the data files, removed as soon as the session exists. Where that folder is
read-only, the weights are handed over by name instead, and ORT copies them once.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxopt.errors import VerificationError


class RunnableModel:
    """An ORT session over an onnx-ir model; ``extra_outputs`` exposes intermediate values."""

    def __init__(self, model: ir.Model, extra_outputs: Iterable[str] = ()) -> None:
        proto = ir.to_proto(model)
        extra_outputs = tuple(extra_outputs)
        if extra_outputs:
            _expose(proto, extra_outputs)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        # Pre-packing would copy every MatMul weight; verification does not need the speed.
        options.add_session_config_entry("session.disable_prepacking", "1")
        try:
            self._session = create_session(model, proto, options)
        except Exception as err:
            raise VerificationError(f"ONNX Runtime cannot load the model: {_line(err)}") from None
        self.output_names = [o.name for o in self._session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            results = self._session.run(None, feeds)
        except Exception as err:
            raise VerificationError(f"ONNX Runtime failed to run the model: {_line(err)}") from None
        return dict(zip(self.output_names, results, strict=True))


def run(model: ir.Model, cases: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Run ``model`` on each feed dict; one output dict per case."""
    runnable = RunnableModel(model)
    return [runnable.run(feeds) for feeds in cases]


def create_session(
    model: ir.Model, proto: onnx.ModelProto, options: ort.SessionOptions
) -> ort.InferenceSession:
    providers = ["CPUExecutionProvider"]
    external = _external_tensors(model)
    if not external:
        return ort.InferenceSession(proto.SerializeToString(), options, providers=providers)
    folder = Path(os.path.commonpath([Path(t.path).absolute().parent for t in external.values()]))
    for tensor in proto.graph.initializer:
        if tensor.name in external:
            location = os.path.relpath(Path(external[tensor.name].path).absolute(), folder)
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
    try:
        handle, name = tempfile.mkstemp(prefix=".onnxopt-run-", suffix=".onnx", dir=folder)
    except OSError:  # a read-only folder: ORT gets the weights by name and copies them
        return _session_with_overrides(model, proto, options, external)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(proto.SerializeToString())
        return ort.InferenceSession(name, options, providers=providers)
    finally:
        os.unlink(name)


def _external_tensors(model: ir.Model) -> dict[str, ir.ExternalTensor]:
    return {
        name: value.const_value
        for name, value in model.graph.initializers.items()
        if isinstance(value.const_value, ir.ExternalTensor)
    }


def _session_with_overrides(
    model: ir.Model,
    proto: onnx.ModelProto,
    options: ort.SessionOptions,
    external: dict[str, ir.ExternalTensor],
) -> ort.InferenceSession:
    """Hand external weights to ORT by name (it copies them); unused ones are dropped first."""
    used = {name for name in external if model.graph.initializers[name].uses()}
    kept = [t for t in proto.graph.initializer if t.name not in external or t.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    names = sorted(used)
    values = [ort.OrtValue.ortvalue_from_numpy(external[name].numpy()) for name in names]
    options.add_external_initializers(names, values)
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    session.onnxopt_keepalive = values  # ORT may read the buffers after session creation
    return session


def _expose(proto: onnx.ModelProto, names: tuple[str, ...]) -> None:
    """Add intermediate values as graph outputs, typed by ONNX shape inference."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {vi.name: vi.type for vi in inferred.graph.value_info}
    present = {o.name for o in proto.graph.output}
    for name in names:
        value_type = types.get(name)
        if name in present or value_type is None or not value_type.HasField("tensor_type"):
            continue
        elem_type = value_type.tensor_type.elem_type
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, elem_type, None))


def _line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:300]
