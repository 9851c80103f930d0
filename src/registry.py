"""The pass registry: built-in passes load lazily by name; users register their own."""

from __future__ import annotations

import importlib

from onnxopt.pass_api import Pass

# name -> module that defines (and registers) the pass; imported on first use.
_BUILTIN: dict[str, str] = {
    "fold-constants": "onnxopt.passes.fold_constants",
    "cleanup": "onnxopt.passes.cleanup",
    "infer-shapes": "onnxopt.passes.infer_shapes",
    "fold-batchnorm": "onnxopt.passes.fold_batchnorm",
    "lower": "onnxopt.passes.lower",
    "fuse-layer-norm": "onnxopt.passes.fuse_layer_norm",
    "fuse-rms-norm": "onnxopt.passes.fuse_rms_norm",
    "fuse-gelu": "onnxopt.passes.fuse_gelu",
    "fuse-rotary": "onnxopt.passes.fuse_rotary",
    "fuse-attention": "onnxopt.passes.fuse_attention",
    "fuse-skip-layer-norm": "onnxopt.passes.fuse_skip_layer_norm",
    "fuse-bias": "onnxopt.passes.fuse_bias",
    "quant-int4": "onnxopt.passes.quant_int4",
    "quant-int8": "onnxopt.passes.quant_int8",
    "quant-embeddings": "onnxopt.passes.quant_embeddings",
    "fp16": "onnxopt.passes.fp16",
    "mixed-precision": "onnxopt.passes.mixed_precision",
    "stream": "onnxopt.passes.stream",
    "stream-rnn": "onnxopt.passes.stream_rnn",
    "stream-conv": "onnxopt.passes.stream_conv",
    "stream-attention": "onnxopt.passes.stream_attention",
}
# alias -> the pipeline spec it expands to.
_ALIASES: dict[str, str] = {
    "simplify": "infer-shapes,fold-constants,fold-batchnorm,cleanup,infer-shapes",
    # Norms and GELU first (attention patterns see fused ops around them), then attention, then
    # the residual Adds into skip-norms, then what bias Adds are left.
    "fuse": "simplify,fuse-layer-norm,fuse-rms-norm,fuse-gelu,fuse-rotary,fuse-attention,"
    "fuse-skip-layer-norm,fuse-bias,cleanup",
}
_PASSES: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass] | None = None, *, replace: bool = False):
    """Register a pass class under its ``name``; a decorator, with or without arguments."""

    def register(pass_cls: type[Pass]) -> type[Pass]:
        if not (isinstance(pass_cls, type) and issubclass(pass_cls, Pass)):
            raise TypeError(f"{pass_cls!r} is not a subclass of onnxopt.Pass")
        name = pass_cls.name
        if not name or name != name.lower() or " " in name or "_" in name or "," in name:
            raise ValueError(f"pass name must be kebab-case, got {name!r}")
        taken = _PASSES.get(name)
        builtin = name in _BUILTIN and pass_cls.__module__ != _BUILTIN[name]
        if not replace and ((taken and taken is not pass_cls) or builtin or name in _ALIASES):
            raise ValueError(f"a pass or alias named {name!r} is already registered")
        _PASSES[name] = pass_cls
        return pass_cls

    return register(cls) if cls is not None else register


def register_alias(name: str, spec: str, *, replace: bool = False) -> None:
    """Make ``name`` expand to the pipeline ``spec`` (checked when it is used)."""
    if not replace and (name in _ALIASES or name in pass_names()):
        raise ValueError(f"a pass or alias named {name!r} is already registered")
    _ALIASES[name] = spec


def get_pass(name: str) -> type[Pass] | None:
    """The pass class called ``name``, importing a built-in on first use; None if unknown."""
    if name not in _PASSES and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    return _PASSES.get(name)


def pass_names() -> list[str]:
    return sorted(set(_BUILTIN) | set(_PASSES))


def aliases() -> dict[str, str]:
    return dict(_ALIASES)
