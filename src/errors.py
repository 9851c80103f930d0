"""Errors a user can cause, each with a one-line message and the CLI exit code it maps to."""

from __future__ import annotations


class OnnxoptError(Exception):
    """Base class: a problem with the user's input, reported without a traceback."""

    exit_code = 1


class UsageError(OnnxoptError):
    """Bad command line, pipeline spec, pass option or golden set (exit 2)."""

    exit_code = 2


class VerificationError(OnnxoptError):
    """A pass broke the model's numerics or structure (exit 3)."""

    exit_code = 3


class UnsupportedModelError(OnnxoptError):
    """The input is missing, not ONNX, corrupt, or something onnxopt cannot handle (exit 4)."""

    exit_code = 4
