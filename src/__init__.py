"""onnxopt: a verified ONNX graph-rewriting compiler.

The public API::

    model, report = onnxopt.optimize("model.onnx", passes="simplify", output="out.onnx")
"""

from __future__ import annotations

from onnxopt.api import optimize
from onnxopt.errors import OnnxoptError, UnsupportedModelError, UsageError, VerificationError
from onnxopt.golden import GoldenSet
from onnxopt.gs_adapter import gs_pass
from onnxopt.metrics import Tolerance
from onnxopt.model_io import load, save
from onnxopt.pass_api import Pass, PassResult
from onnxopt.pipeline import Pipeline
from onnxopt.registry import register_alias, register_pass
from onnxopt.report import PassReport, Report
from onnxopt.streaming import StreamingSession

__version__ = "0.1.0"

__all__ = [
    "GoldenSet",
    "OnnxoptError",
    "Pass",
    "PassReport",
    "PassResult",
    "Pipeline",
    "Report",
    "StreamingSession",
    "Tolerance",
    "UnsupportedModelError",
    "UsageError",
    "VerificationError",
    "gs_pass",
    "load",
    "optimize",
    "register_alias",
    "register_pass",
    "save",
]
