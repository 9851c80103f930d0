"""Load and save models with onnx-ir: lazy external data, atomic writes, the input never touched."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from onnxopt.errors import UnsupportedModelError, UsageError

# Protobuf refuses messages of 2 GiB; past this total of weights we write external data.
EXTERNAL_DATA_THRESHOLD = 1536 * 1024**2


def load(path: str | os.PathLike) -> ir.Model:
    """Load a model lazily: weights in external data stay memory-mapped on disk."""
    path = Path(path)
    if not path.exists():
        raise UnsupportedModelError(f"no such file: {path}")
    if not path.is_file():
        raise UnsupportedModelError(f"not a file: {path}")
    try:
        proto = onnx.load(path, load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as err:
        raise UnsupportedModelError(
            f"{path} is not a readable ONNX model ({_first_line(err)})"
        ) from None
    if not proto.HasField("graph") or proto.ir_version <= 0:
        raise UnsupportedModelError(f"{path} is not an ONNX model (no graph or no ir_version)")
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as err:
        raise UnsupportedModelError(f"{path}: cannot read the model ({_first_line(err)})") from None
    ir.external_data.set_base_dir(model.graph, path.parent)
    for data_path in external_data_files(model):
        if not data_path.is_file():
            raise UnsupportedModelError(f"{path}: external data file missing: {data_path}")
    return model


def save(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    protected: tuple[str | os.PathLike, ...] = (),
) -> Path:
    """Write a model atomically: into a temporary folder beside ``path``, then renamed in place.

    Args:
        model: The model; it is not changed.
        path: Where the ``.onnx`` file goes. External data goes beside it as ``<name>.data``.
        external_data: True or False to force; None writes external data when the model
            already keeps weights outside the protobuf or its weights pass 1.5 GiB.
        protected: Files that must not be overwritten (the input model and its data).

    Returns:
        The path written.
    """
    path = Path(path).absolute()
    data_name = path.name + ".data"
    check_writable(path, (*protected, *external_data_files(model)))
    if external_data is None:
        external_data = has_external_data(model) or weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
    if not external_data and has_external_data(model):
        # Embedding weights means reading them; a clone keeps the caller's model lazy.
        model = ir.external_data.load_to_model(model.clone())
    tmp_dir = Path(tempfile.mkdtemp(prefix=".onnxopt-", dir=path.parent))
    try:
        ir.save(model, tmp_dir / path.name, external_data=data_name if external_data else None)
        if (tmp_dir / data_name).exists():
            os.replace(tmp_dir / data_name, path.with_name(data_name))
        os.replace(tmp_dir / path.name, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def check_writable(path: str | os.PathLike, protected: tuple[str | os.PathLike, ...]) -> None:
    """Raise UsageError if writing ``path`` (and its ``.data``) would clobber a protected file."""
    path = Path(path).absolute()
    refused = {_real(p) for p in protected}
    for target in (path, path.with_name(path.name + ".data")):
        if _real(target) in refused:
            raise UsageError(f"refusing to overwrite the input: {target}")
    if not path.parent.is_dir():
        raise UsageError(f"output folder does not exist: {path.parent}")
    if path.is_dir():
        raise UsageError(f"output is a folder: {path}")


def tensors(model: ir.Model) -> Iterator[ir.TensorProtocol]:
    """Every initializer tensor, in the main graph and its subgraphs."""
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield value.const_value


def external_data_files(model: ir.Model) -> set[Path]:
    """The external data files the model's weights live in."""
    return {Path(t.path) for t in tensors(model) if isinstance(t, ir.ExternalTensor)}


def has_external_data(model: ir.Model) -> bool:
    return any(isinstance(t, ir.ExternalTensor) for t in tensors(model))


def weight_bytes(model: ir.Model) -> int:
    """Total size of the initializers, computed from shapes (nothing is read)."""
    return sum(t.nbytes for t in tensors(model))


def _real(path: str | os.PathLike) -> str:
    return os.path.realpath(path)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
