"""Run an onnx-ir model in ONNX Runtime (CPU, ORT's own graph optimizations off).

Weights in external data are handed to ORT as memory-mapped arrays, so running a large model
neither copies its weights into a protobuf nor needs the data file beside a temporary copy.
"""

from __future__ import annotations

from collections.abc import Iterable

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
        # External tensors: override by name with views of the memory-mapped file.
        self._arrays = []
        names, values = [], []
        for name, value in model.graph.initializers.items():
            if isinstance(value.const_value, ir.ExternalTensor):
                array = value.const_value.numpy()
                self._arrays.append(array)
                names.append(name)
                values.append(ort.OrtValue.ortvalue_from_numpy(array))
        if names:
            options.add_external_initializers(names, values)
        try:
            self._session = ort.InferenceSession(
                proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
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
