"""Build the fusion model zoo: transformers models with random weights, exported by both exporters.

Every model is built from a transformers *config* (no hub download), seeded, re-initialised with
random weights that are not trivial (LayerNorm scales near 1 but not 1, biases non-zero, weights at
fan-in scale so attention is not uniform), and exported twice:

- TorchScript: ``torch.onnx.export(..., dynamo=False, opset_version=17)``
- dynamo: ``torch.onnx.export(..., dynamo=True)`` at torch's default opset

Each file is checked against torch (max abs diff) at two input shapes in ONNX Runtime with graph
optimizations off. With ``--golden`` (on for ``--size tiny``) a golden set is written beside each
file through onnxopt's own ``golden`` command, and ``manifest.json`` records config, opset, node
count, op histogram, attention chain and the expected-fusion inventory of every file.

Run with a Python that has torch and transformers (the ``zoo`` extra)::

    python benchmarks/fusion/zoo.py --size tiny --out golden/zoo
    python benchmarks/fusion/zoo.py --size bench --out /tmp/onnxopt-fusion-zoo --no-golden
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import transformers
from torch import nn

SEED = 0
MODELS = (
    "bert",
    "whisper",
    "wav2vec2",
    "conformer",
    "conformer_rotary",
    "parakeet",
    "gpt2",
    "gpt2_kv",
    "llama",
    "llama_kv",
)
EXPORTERS = ("ts", "dynamo")
TS_OPSET = 17
KEEP_METADATA = {"namespace", "pkg.onnxscript.rewriter.rule_name"}


@dataclasses.dataclass
class Case:
    """One input shape: batch, sequence (tokens, frames or samples) and past length."""

    batch: int
    seq: int
    past: int = 0


@dataclasses.dataclass
class Spec:
    """A model ready to export: a module taking positional tensors, and how to feed it."""

    name: str
    module: nn.Module
    input_names: list[str]
    output_names: list[str]
    make_inputs: Callable[[Case], dict[str, torch.Tensor]]
    dynamic: dict[str, dict[int, str]]  # graph inputs and outputs: axis -> dim name
    export_case: Case
    golden_cases: list[Case]
    bench_case: Case
    config: dict
    inventory: dict
    notes: list[str] = dataclasses.field(default_factory=list)


class Positional(nn.Module):
    """Calls ``fn(model, **named inputs)`` from positional inputs; returns a tuple of tensors."""

    def __init__(self, model: nn.Module, names: list[str], fn: Callable) -> None:
        super().__init__()
        self.model = model
        self.names = names
        self.fn = fn
        self.eval()  # exporters restore this mode on the whole tree afterwards

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.fn(self.model, **dict(zip(self.names, inputs, strict=True))))


# ----------------------------------------------------------------------------- weights


@torch.no_grad()
def randomize(model: nn.Module, seed: int = SEED) -> nn.Module:
    """Seeded random weights that keep every op meaningful (no unit scales, no zero biases)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        shape = param.shape
        noise = torch.randn(shape, generator=gen, dtype=param.dtype)
        if param.dim() >= 2:
            fan_in = max(1, math.prod(shape[1:]))
            param.copy_(noise / math.sqrt(fan_in))
        elif name.endswith("weight"):  # norm scales
            param.copy_(1.0 + 0.1 * noise)
        else:  # biases, relative-position biases
            param.copy_(0.1 * noise)
    for name, buf in model.named_buffers():
        if name.endswith("running_mean"):
            buf.copy_(0.1 * torch.randn(buf.shape, generator=gen))
        elif name.endswith("running_var"):
            buf.copy_(0.5 + torch.rand(buf.shape, generator=gen))
    return model.eval()


def build(cls, config, attn: str):
    """``cls(config)`` with the requested attention implementation ("default" = what users get)."""
    torch.manual_seed(SEED)
    if attn != "default":
        config._attn_implementation = attn
    model = cls(config)
    return randomize(model), getattr(model.config, "_attn_implementation", None)


def summary(config, keys: list[str]) -> dict:
    return {k: getattr(config, k) for k in keys if hasattr(config, k)}


# ----------------------------------------------------------------------------- inputs


def token_inputs(vocab: int, with_types: bool = False):
    """input_ids below ``vocab``; attention_mask of ones with padding at the end of row 1."""

    def make(case: Case) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(SEED + 7 * case.batch + case.seq + 13 * case.past)
        ids = torch.randint(0, vocab, (case.batch, case.seq), generator=gen)
        total = case.past + case.seq
        mask = torch.ones(case.batch, total, dtype=torch.int64)
        if case.batch > 1:
            pad = min(3, total // 3)
            if case.past:  # left padding (generation): the oldest past positions of row 1
                mask[1, :pad] = 0
            else:
                mask[1, total - pad :] = 0
        feeds = {"input_ids": ids, "attention_mask": mask}
        if with_types:
            types = torch.zeros_like(ids)
            types[:, case.seq // 2 :] = 1
            feeds["token_type_ids"] = types
        return feeds

    return make


def float_inputs(name: str, shape_of: Callable[[Case], tuple[int, ...]]):
    def make(case: Case) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(SEED + 7 * case.batch + case.seq)
        return {name: torch.randn(shape_of(case), generator=gen)}

    return make


# ----------------------------------------------------------------------------- models


def bert(size: str, attn: str) -> Spec:
    cfg = transformers.BertConfig(
        vocab_size=100 if size == "tiny" else 30522,
        hidden_size=32 if size == "tiny" else 384,
        num_attention_heads=2 if size == "tiny" else 12,
        num_hidden_layers=2 if size == "tiny" else 6,
        intermediate_size=64 if size == "tiny" else 1536,
        max_position_embeddings=64 if size == "tiny" else 512,
    )
    model, impl = build(transformers.BertModel, cfg, attn)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    layers = cfg.num_hidden_layers

    def fn(m, **kw):
        return [m(**kw).last_hidden_state]

    tok = {0: "batch", 1: "seq"}
    return Spec(
        name="bert",
        module=Positional(model, names, fn),
        input_names=names,
        output_names=["last_hidden_state"],
        make_inputs=token_inputs(cfg.vocab_size, with_types=True),
        dynamic={
            "input_ids": tok,
            "attention_mask": tok,
            "token_type_ids": tok,
            "last_hidden_state": tok,
        },
        export_case=Case(2, 9),
        golden_cases=[Case(1, 7), Case(2, 11)],
        bench_case=Case(1, 128),
        config={
            "class": "BertModel",
            "attn_implementation": impl,
            **summary(
                cfg,
                [
                    "vocab_size",
                    "hidden_size",
                    "num_attention_heads",
                    "num_hidden_layers",
                    "intermediate_size",
                    "hidden_act",
                ],
            ),
        },
        inventory={
            "attention": layers,
            "layer_norm": 2 * layers + 1,
            "add_layer_norm": 2 * layers,
            "embed_add_layer_norm": 1,
            "gelu": layers,
            "rms_norm": 0,
            "note": "post-LN; embeddings word+position+type Add -> LayerNorm (EmbedLayerNorm); "
            "per layer: attention out + residual -> LN, FFN out + residual -> LN; GELU exact (Erf)",
        },
    )


def whisper(size: str, attn: str) -> Spec:
    tiny = size == "tiny"
    cfg = transformers.WhisperConfig(
        vocab_size=100,
        num_mel_bins=16 if tiny else 80,
        d_model=32 if tiny else 384,
        encoder_attention_heads=2 if tiny else 6,
        encoder_layers=2 if tiny else 4,
        encoder_ffn_dim=64 if tiny else 1536,
        decoder_attention_heads=2,
        decoder_layers=1,
        decoder_ffn_dim=64,
        max_source_positions=8 if tiny else 250,
        max_target_positions=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=3,
    )
    model, impl = build(transformers.models.whisper.modeling_whisper.WhisperEncoder, cfg, attn)
    frames = 2 * cfg.max_source_positions
    layers = cfg.encoder_layers

    def fn(m, input_features):
        return [m(input_features=input_features).last_hidden_state]

    return Spec(
        name="whisper",
        module=Positional(model, ["input_features"], fn),
        input_names=["input_features"],
        output_names=["last_hidden_state"],
        make_inputs=float_inputs("input_features", lambda c: (c.batch, cfg.num_mel_bins, frames)),
        dynamic={"input_features": {0: "batch"}, "last_hidden_state": {0: "batch"}},
        export_case=Case(2, frames),
        golden_cases=[Case(1, frames), Case(2, frames)],
        bench_case=Case(1, frames),
        config={
            "class": "WhisperEncoder",
            "attn_implementation": impl,
            "input_frames": frames,
            **summary(
                cfg,
                [
                    "num_mel_bins",
                    "d_model",
                    "encoder_attention_heads",
                    "encoder_layers",
                    "encoder_ffn_dim",
                    "max_source_positions",
                    "activation_function",
                ],
            ),
        },
        inventory={
            "attention": layers,
            "layer_norm": 2 * layers + 1,
            "add_layer_norm": 2 * layers,
            "embed_add_layer_norm": 1,
            "gelu": layers + 2,
            "rms_norm": 0,
            "note": "pre-LN; frames fixed at 2*max_source_positions (WhisperEncoder checks "
            "it), only batch is dynamic; conv GELU x2 + FFN GELU per layer (exact); "
            "positional Add -> LN1 of layer 0; per layer attention residual Add -> LN2, "
            "FFN residual Add -> next LN1/final LN; k_proj has no bias",
        },
    )


def _wav2vec2_common(tiny: bool) -> dict:
    if tiny:
        return dict(
            hidden_size=32,
            num_attention_heads=2,
            num_hidden_layers=2,
            intermediate_size=64,
            conv_dim=(32, 32, 32),
            conv_kernel=(10, 3, 3),
            conv_stride=(5, 2, 2),
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4,
            vocab_size=32,
        )
    return dict(
        hidden_size=384,
        num_attention_heads=6,
        num_hidden_layers=4,
        intermediate_size=1536,
        num_conv_pos_embeddings=128,
        num_conv_pos_embedding_groups=16,
        vocab_size=32,
    )


def wav2vec2(size: str, attn: str) -> Spec:
    tiny = size == "tiny"
    cfg = transformers.Wav2Vec2Config(**_wav2vec2_common(tiny))
    model, impl = build(transformers.Wav2Vec2Model, cfg, attn)
    layers, n_conv = cfg.num_hidden_layers, len(cfg.conv_dim)

    def fn(m, input_values):
        return [m(input_values=input_values).last_hidden_state]

    return Spec(
        name="wav2vec2",
        module=Positional(model, ["input_values"], fn),
        input_names=["input_values"],
        output_names=["last_hidden_state"],
        make_inputs=float_inputs("input_values", lambda c: (c.batch, c.seq)),
        dynamic={
            "input_values": {0: "batch", 1: "samples"},
            "last_hidden_state": {0: "batch", 1: "frames"},
        },
        export_case=Case(2, 400 if tiny else 16000),
        golden_cases=[Case(1, 400), Case(2, 560)],
        bench_case=Case(1, 32000),
        config={
            "class": "Wav2Vec2Model",
            "attn_implementation": impl,
            **summary(
                cfg,
                [
                    "hidden_size",
                    "num_attention_heads",
                    "num_hidden_layers",
                    "intermediate_size",
                    "conv_dim",
                    "conv_kernel",
                    "conv_stride",
                    "num_conv_pos_embeddings",
                    "num_conv_pos_embedding_groups",
                    "feat_extract_norm",
                    "do_stable_layer_norm",
                    "hidden_act",
                ],
            ),
        },
        inventory={
            "attention": layers,
            "layer_norm": 2 * layers + 2,
            "add_layer_norm": 2 * layers,
            "embed_add_layer_norm": 1,
            "gelu": n_conv + 1 + layers,
            "group_norm": 1,
            "rms_norm": 0,
            "note": "do_stable_layer_norm=False (default, post-LN like wav2vec2-base); feature "
            "extractor conv+GELU x n_conv (GroupNorm after conv 0); feature projection LN; "
            "positional conv (weight norm) + GELU, hidden + pos Add -> encoder LN; per layer "
            "attention residual Add -> LN, FFN residual Add -> final LN",
        },
    )


def conformer(size: str, attn: str, rotary: bool = False) -> Spec:
    tiny = size == "tiny"
    cfg = transformers.Wav2Vec2ConformerConfig(
        **_wav2vec2_common(tiny),
        position_embeddings_type="rotary" if rotary else "relative",
        conv_depthwise_kernel_size=7 if tiny else 31,
        max_source_positions=64 if tiny else 1000,
    )
    model, impl = build(transformers.Wav2Vec2ConformerModel, cfg, attn)
    layers, n_conv = cfg.num_hidden_layers, len(cfg.conv_dim)

    def fn(m, input_values):
        return [m(input_values=input_values).last_hidden_state]

    return Spec(
        name="conformer_rotary" if rotary else "conformer",
        module=Positional(model, ["input_values"], fn),
        input_names=["input_values"],
        output_names=["last_hidden_state"],
        make_inputs=float_inputs("input_values", lambda c: (c.batch, c.seq)),
        dynamic={
            "input_values": {0: "batch", 1: "samples"},
            "last_hidden_state": {0: "batch", 1: "frames"},
        },
        export_case=Case(2, 400 if tiny else 16000),
        golden_cases=[Case(1, 400), Case(2, 560)],
        bench_case=Case(1, 32000),
        config={
            "class": "Wav2Vec2ConformerModel",
            "attn_implementation": impl,
            **summary(
                cfg,
                [
                    "position_embeddings_type",
                    "hidden_size",
                    "num_attention_heads",
                    "num_hidden_layers",
                    "intermediate_size",
                    "conv_dim",
                    "conv_kernel",
                    "conv_stride",
                    "conv_depthwise_kernel_size",
                    "hidden_act",
                ],
            ),
        },
        inventory={
            "attention": layers,
            "layer_norm": 5 * layers + 2,
            "add_layer_norm": 4 * layers,
            "embed_add_layer_norm": 0,
            "gelu": n_conv + 3 * layers,
            "group_norm": 1,
            "batch_norm": layers,
            "rotary": layers if rotary else 0,
            "rms_norm": 0,
            "note": "Conformer block: FFN1 (LN, x0.5 residual), self-attention (LN, "
            + (
                "rotary: one rotate_half per layer on the hidden states before the q/k "
                "projections, not the usual RotaryEmbedding on q and k"
                if rotary
                else "relative position: linear_pos, pos_bias_u/v, rel-shift Pad/Reshape/"
                "Slice, matrix_ac + matrix_bd"
            )
            + "), conv module (LN, pointwise, GLU, depthwise, BatchNorm, GELU, pointwise), FFN2 "
            "(LN, x0.5 residual), final LN; feature projection LN + encoder LN at the end "
            "(LN->LN between layers, no Add); hidden_act gelu (transformers default); the "
            "positional conv exists but is unused",
        },
    )


def parakeet(size: str, attn: str) -> Spec:
    tiny = size == "tiny"
    cfg = transformers.ParakeetEncoderConfig(
        hidden_size=32 if tiny else 256,
        num_attention_heads=2 if tiny else 4,
        num_key_value_heads=2 if tiny else 4,
        num_hidden_layers=2 if tiny else 4,
        intermediate_size=64 if tiny else 1024,
        num_mel_bins=16 if tiny else 80,
        subsampling_conv_channels=16 if tiny else 256,
        conv_kernel_size=9,
        max_position_embeddings=512 if tiny else 5000,
    )
    model, impl = build(transformers.ParakeetEncoder, cfg, attn)
    layers = cfg.num_hidden_layers

    def fn(m, input_features):
        return [m(input_features=input_features).last_hidden_state]

    return Spec(
        name="parakeet",
        module=Positional(model, ["input_features"], fn),
        input_names=["input_features"],
        output_names=["last_hidden_state"],
        make_inputs=float_inputs("input_features", lambda c: (c.batch, c.seq, cfg.num_mel_bins)),
        dynamic={
            "input_features": {0: "batch", 1: "frames"},
            "last_hidden_state": {0: "batch", 1: "enc_frames"},
        },
        export_case=Case(2, 64 if tiny else 400),
        golden_cases=[Case(1, 40), Case(2, 64)],
        bench_case=Case(1, 400),
        config={
            "class": "ParakeetEncoder",
            "attn_implementation": impl,
            **summary(
                cfg,
                [
                    "hidden_size",
                    "num_attention_heads",
                    "num_hidden_layers",
                    "intermediate_size",
                    "num_mel_bins",
                    "subsampling_factor",
                    "subsampling_conv_channels",
                    "conv_kernel_size",
                    "hidden_act",
                ],
            ),
        },
        inventory={
            "attention": layers,
            "layer_norm": 5 * layers,
            "add_layer_norm": 4 * layers,
            "embed_add_layer_norm": 0,
            "gelu": 0,
            "silu": 3 * layers,
            "batch_norm": layers,
            "rms_norm": 0,
            "note": "FastConformer: 3x Conv2d subsampling (x8) + ReLU, Linear; input x scale; "
            "relative-position attention (linear_pos, bias u/v, rel-shift); SiLU FFNs and conv "
            "module; 5 LN per block, no final LN; LN->LN between blocks (no Add)",
        },
    )


def gpt2(size: str, attn: str, kv: bool = False) -> Spec:
    tiny = size == "tiny"
    cfg = transformers.GPT2Config(
        vocab_size=100 if tiny else 8192,
        n_embd=32 if tiny else 512,
        n_head=2 if tiny else 8,
        n_layer=2 if tiny else 4,
        n_positions=64 if tiny else 1024,
    )
    model, impl = build(transformers.GPT2LMHeadModel, cfg, attn)
    layers = cfg.n_layer
    head_dim = cfg.n_embd // cfg.n_head
    spec = _decoder_spec(
        "gpt2",
        model,
        cfg,
        layers,
        cfg.n_head,
        head_dim,
        kv,
        tiny,
        config={
            "class": "GPT2LMHeadModel",
            "attn_implementation": impl,
            **summary(
                cfg, ["vocab_size", "n_embd", "n_head", "n_layer", "n_inner", "activation_function"]
            ),
        },
        inventory={
            "attention": layers,
            "layer_norm": 2 * layers + 1,
            "add_layer_norm": 2 * layers,
            "embed_add_layer_norm": 1,
            "gelu": layers,
            "rms_norm": 0,
            "note": "pre-LN; wte+wpe Add -> ln_1 of block 0; per block attention residual Add "
            "-> ln_2, MLP residual Add -> next ln_1 / ln_f; gelu_new = tanh approximation "
            "(FastGelu); Conv1D = MatMul+Add with fused c_attn (one QKV MatMul, Split); causal "
            "mask; tied LM head",
        },
    )
    return spec


def llama(size: str, attn: str, kv: bool = False) -> Spec:
    tiny = size == "tiny"
    cfg = transformers.LlamaConfig(
        vocab_size=100 if tiny else 8192,
        hidden_size=32 if tiny else 512,
        num_attention_heads=4 if tiny else 8,
        num_key_value_heads=2 if tiny else 4,
        num_hidden_layers=2 if tiny else 4,
        intermediate_size=64 if tiny else 1376,
        max_position_embeddings=128 if tiny else 2048,
    )
    model, impl = build(transformers.LlamaForCausalLM, cfg, attn)
    layers = cfg.num_hidden_layers
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return _decoder_spec(
        "llama",
        model,
        cfg,
        layers,
        cfg.num_key_value_heads,
        head_dim,
        kv,
        tiny,
        config={
            "class": "LlamaForCausalLM",
            "attn_implementation": impl,
            **summary(
                cfg,
                [
                    "vocab_size",
                    "hidden_size",
                    "num_attention_heads",
                    "num_key_value_heads",
                    "num_hidden_layers",
                    "intermediate_size",
                    "hidden_act",
                    "rope_parameters",
                ],
            ),
        },
        inventory={
            "attention": layers,
            "group_query_attention": layers,
            "rotary": 2 * layers,
            "layer_norm": 0,
            "add_layer_norm": 0,
            "rms_norm": 2 * layers + 1,
            "add_rms_norm": 2 * layers,
            "gelu": 0,
            "silu": layers,
            "note": "pre-RMSNorm; embedding Gather -> input_layernorm of layer 0 (no Add); per "
            "layer attention residual Add -> post_attention_layernorm, MLP residual Add -> next "
            "input_layernorm / final norm; rotary on q and k (rotate_half); GQA: k/v repeated "
            "(repeat_kv) to the query heads; SwiGLU MLP (SiLU)",
        },
    )


def _decoder_spec(name, model, cfg, layers, kv_heads, head_dim, kv, tiny, config, inventory):
    tok = {0: "batch", 1: "seq"}
    if not kv:
        names = ["input_ids", "attention_mask"]

        def fn(m, input_ids, attention_mask):
            return [m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits]

        return Spec(
            name=name,
            module=Positional(model, names, fn),
            input_names=names,
            output_names=["logits"],
            make_inputs=token_inputs(cfg.vocab_size),
            dynamic={"input_ids": tok, "attention_mask": tok, "logits": tok},
            export_case=Case(2, 9),
            golden_cases=[Case(1, 7), Case(2, 11)],
            bench_case=Case(1, 128),
            config=config,
            inventory=inventory,
        )
    past_names = [
        f"past_key_values.{i}.{kv_name}" for i in range(layers) for kv_name in ("key", "value")
    ]
    present_names = [n.replace("past_key_values", "present") for n in past_names]
    names = ["input_ids", "attention_mask", *past_names]
    tokens = token_inputs(cfg.vocab_size)

    def make(case: Case) -> dict[str, torch.Tensor]:
        feeds = tokens(case)
        gen = torch.Generator().manual_seed(SEED + 100 + case.past)
        for past_name in past_names:
            feeds[past_name] = torch.randn(case.batch, kv_heads, case.past, head_dim, generator=gen)
        return feeds

    def fn(m, input_ids, attention_mask, **past):
        flat = [past[n] for n in past_names]
        cache = transformers.DynamicCache(
            ddp_cache_data=[(flat[2 * i], flat[2 * i + 1]) for i in range(layers)]
        )
        out = m(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=cache,
            use_cache=True,
        )
        presents = []
        for layer in out.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return [out.logits, *presents]

    dynamic = {"input_ids": tok, "attention_mask": {0: "batch", 1: "total_seq"}, "logits": tok}
    for past_name, present_name in zip(past_names, present_names, strict=True):
        dynamic[past_name] = {0: "batch", 2: "past_seq"}
        dynamic[present_name] = {0: "batch", 2: "total_seq"}
    return Spec(
        name=f"{name}_kv",
        module=Positional(model, names, fn),
        input_names=names,
        output_names=["logits", *present_names],
        make_inputs=make,
        dynamic=dynamic,
        export_case=Case(2, 3, 5),
        golden_cases=[Case(1, 7, 3), Case(2, 1, 6)],
        bench_case=Case(1, 1, 128),
        config={**config, "kv_cache": "DynamicCache"},
        inventory=inventory,
        notes=[
            "past/present as flat tensors [batch, kv_heads, past_seq, head_dim]; the "
            "wrapper builds DynamicCache(ddp_cache_data=...) and returns layer.keys/values"
        ],
    )


BUILDERS: dict[str, Callable[[str, str], Spec]] = {
    "bert": bert,
    "whisper": whisper,
    "wav2vec2": wav2vec2,
    "conformer": conformer,
    "conformer_rotary": lambda s, a: conformer(s, a, rotary=True),
    "parakeet": parakeet,
    "gpt2": gpt2,
    "gpt2_kv": lambda s, a: gpt2(s, a, kv=True),
    "llama": llama,
    "llama_kv": lambda s, a: llama(s, a, kv=True),
}


# ----------------------------------------------------------------------------- export


def export(spec: Spec, exporter: str, path: Path, opset: int | None) -> None:
    feeds = spec.make_inputs(spec.export_case)
    args = tuple(feeds[n] for n in spec.input_names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "ts":
            torch.onnx.export(
                spec.module,
                args,
                str(path),
                dynamo=False,
                opset_version=TS_OPSET,
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_axes={k: v for k, v in spec.dynamic.items()},
            )
            return
        dynamic_shapes = (tuple(spec.dynamic.get(n) for n in spec.input_names),)
        program = torch.onnx.export(
            spec.module,
            args,
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=dynamic_shapes,
            input_names=spec.input_names,
            output_names=spec.output_names,
        )
        strip_metadata(program.model)
        program.save(str(path))


def strip_metadata(model) -> None:
    """Keep only the module ``namespace`` of each node from the dynamo exporter's metadata.

    The stack traces (machine paths), FX node text, class hierarchy and name scopes are more than
    half of a tiny file and no fusion reads them; ``namespace`` still names the module a node
    came from.
    """
    for node in model.graph.all_nodes():
        for key in list(node.metadata_props):
            if key not in KEEP_METADATA:
                del node.metadata_props[key]


def ort_session(path: Path, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_against_torch(spec: Spec, path: Path) -> list[dict]:
    """Max abs diff torch vs ORT (optimizations off) for every golden case."""
    session = ort_session(path)
    results = []
    for case in spec.golden_cases:
        feeds = spec.make_inputs(case)
        with torch.no_grad():
            expected = spec.module(*(feeds[n] for n in spec.input_names))
        got = session.run(None, {n: feeds[n].numpy() for n in spec.input_names})
        diff = max(float(np.max(np.abs(e.numpy() - g))) for e, g in zip(expected, got, strict=True))
        results.append(
            {
                **dataclasses.asdict(case),
                "max_abs_diff": diff,
                "output_shapes": [list(g.shape) for g in got],
            }
        )
    return results


# ----------------------------------------------------------------------------- inspection


def histogram(model: onnx.ModelProto) -> dict[str, int]:
    counts = collections.Counter(
        (f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type)
        for n in model.graph.node
    )
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def attention_chains(model: onnx.ModelProto) -> dict[str, int]:
    """For each Softmax: the ops from the QK MatMul to it and on to the AV MatMul, e.g.
    ``MatMul>Div>Add>Softmax>MatMul``. Fused attention ops are listed by name."""
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers = collections.defaultdict(list)
    for n in model.graph.node:
        for i in n.input:
            consumers[i].append(n)
    constants = {i.name for i in model.graph.initializer}
    chains = collections.Counter()
    for node in model.graph.node:
        if "Attention" in node.op_type:
            chains[node.op_type] += 1
        if node.op_type != "Softmax":
            continue
        back = _path_to_matmul(node, producer, constants)
        fwd, cur = [], node
        for _ in range(4):
            nxt = consumers.get(cur.output[0], [])
            if not nxt:
                break
            cur = nxt[0]
            fwd.append(cur.op_type)
            if cur.op_type == "MatMul":
                break
        chains[">".join([*back, "Softmax", *fwd])] += 1
    return dict(chains)


def _path_to_matmul(node, producer, constants, depth: int = 8) -> list[str]:
    """Op types on the shortest producer path from the nearest MatMul up to ``node``."""
    frontier, seen = [(node, [])], {id(node)}
    for _ in range(depth):
        nxt = []
        for cur, path in frontier:
            for name in cur.input:
                src = producer.get(name)
                if src is None or name in constants or src.op_type == "Constant":
                    continue
                if id(src) in seen:
                    continue
                seen.add(id(src))
                if src.op_type == "MatMul":
                    return ["MatMul", *path]
                nxt.append((src, [src.op_type, *path]))
        frontier = nxt
    return ["?"]


def opset_of(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


# ----------------------------------------------------------------------------- golden


def write_golden(spec: Spec, onnx_path: Path, golden_python: str) -> Path:
    """Save the golden inputs, then let onnxopt's ``golden`` command capture the outputs."""
    folder = onnx_path.with_suffix(".golden")
    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "inputs.npz"
        arrays = {}
        for i, case in enumerate(spec.golden_cases):
            feeds = spec.make_inputs(case)
            for n in spec.input_names:
                arrays[f"{i}/{n}"] = feeds[n].numpy()
        np.savez(npz, **arrays)
        if folder.exists():
            shutil.rmtree(folder)
        cli = "from onnxopt.cli.main import main; main()"
        cmd = [
            golden_python,
            "-c",
            cli,
            "golden",
            str(onnx_path),
            "-o",
            str(folder),
            "--inputs",
            str(npz),
        ]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    meta_path = folder / "golden.json"
    meta = json.loads(meta_path.read_text())
    meta["cases"] = [
        {
            **c,
            "dims": {
                "batch": case.batch,
                "seq": case.seq,
                **({"past": case.past} if case.past else {}),
            },
        }
        for c, case in zip(meta["cases"], spec.golden_cases, strict=True)
    ]
    meta["source"] = f"benchmarks/fusion/zoo.py (seed {SEED})"
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return folder


# ----------------------------------------------------------------------------- main


def run_one(name: str, exporter: str, args, out: Path) -> dict:
    try:
        spec = BUILDERS[name](args.size, args.attn)
    except Exception as err:
        if args.verbose:
            traceback.print_exc()
        return {
            "model": name,
            "exporter": exporter,
            "error": f"build failed: {type(err).__name__}: {_first_line(err)}",
        }
    path = out / f"{name}_{exporter}.onnx"
    entry: dict = {
        "model": name,
        "exporter": exporter,
        "file": path.name,
        "config": spec.config,
        "inventory": spec.inventory,
        "notes": spec.notes,
        "inputs": spec.input_names,
        "outputs": spec.output_names,
        "bench_case": dataclasses.asdict(spec.bench_case),
    }
    start = time.perf_counter()
    try:
        export(spec, exporter, path, args.dynamo_opset)
    except Exception as err:  # record it and move on: the zoo is best effort per file
        message = f"{type(err).__name__}: {_first_line(err)}"
        if args.verbose:
            traceback.print_exc()
        if args.attn != "default" or spec.config.get("attn_implementation") == "eager":
            entry["error"] = f"export failed: {message}"
            return entry
        # The default (sdpa) failed: what a user does next is export the eager attention.
        spec = BUILDERS[name](args.size, "eager")
        entry["config"] = spec.config
        entry["notes"] = [
            *spec.notes,
            f"export with the default attention failed ({message}); "
            "exported with attn_implementation='eager'",
        ]
        try:
            export(spec, exporter, path, args.dynamo_opset)
        except Exception as err2:
            entry["error"] = f"export failed: {message}; eager too: {_first_line(err2)}"
            return entry
    entry["export_s"] = round(time.perf_counter() - start, 2)
    model = onnx.load(str(path))
    entry.update(
        opset=opset_of(model),
        nodes=len(model.graph.node),
        bytes=path.stat().st_size,
        histogram=histogram(model),
        attention=attention_chains(model),
        graph_inputs=[
            [i.name, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]]
            for i in model.graph.input
        ],
    )
    try:
        entry["check"] = check_against_torch(spec, path)
    except Exception as err:
        entry["error"] = f"ORT check failed: {type(err).__name__}: {_first_line(err)}"
        return entry
    if args.golden:
        try:
            entry["golden"] = write_golden(spec, path, args.golden_python).name
        except subprocess.CalledProcessError as err:
            entry["error"] = f"golden failed: {(err.stderr or err.stdout).strip()[-300:]}"
    return entry


KEY_OPS = (
    "LayerNormalization",
    "Softmax",
    "Erf",
    "Gelu",
    "Tanh",
    "Sigmoid",
    "Pow",
    "ReduceMean",
    "Sqrt",
    "Cos",
    "Sin",
    "Split",
    "Concat",
    "Expand",
    "IsNaN",
    "Where",
    "Constant",
    "Shape",
    "Gather",
)
INVENTORY_KEYS = (
    "attention",
    "layer_norm",
    "add_layer_norm",
    "embed_add_layer_norm",
    "gelu",
    "rms_norm",
    "add_rms_norm",
    "rotary",
    "group_query_attention",
    "silu",
    "batch_norm",
    "group_norm",
)


def tables(manifest: dict) -> str:
    """Markdown tables of a manifest: the files, then the expected-fusion inventory."""
    out = [
        "| file | attn impl | opset | nodes | KB | max diff vs torch | attention chain "
        "(per Softmax) | key ops |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in manifest["models"]:
        if "error" in e:
            out.append(f"| {e['model']}_{e['exporter']} | | | | | | FAILED: {e['error'][:80]} | |")
            continue
        diff = max(c["max_abs_diff"] for c in e["check"])
        chains = "; ".join(f"{k} x{v}" for k, v in e["attention"].items())
        ops = " ".join(f"{k}:{e['histogram'][k]}" for k in KEY_OPS if k in e["histogram"])
        out.append(
            f"| {e['file']} | {e['config'].get('attn_implementation')} | {e['opset']} | "
            f"{e['nodes']} | {e['bytes'] / 1024:.0f} | {diff:.1e} | {chains} | {ops} |"
        )
    out += [
        "",
        "| model | " + " | ".join(INVENTORY_KEYS) + " |",
        "|---|" + "---|" * len(INVENTORY_KEYS),
    ]
    seen = set()
    for e in manifest["models"]:
        if e["model"] in seen or "inventory" not in e:
            continue
        seen.add(e["model"])
        inv = e["inventory"]
        out.append(
            f"| {e['model']} | " + " | ".join(str(inv.get(k, 0)) for k in INVENTORY_KEYS) + " |"
        )
    return "\n".join(out)


def _first_line(err: BaseException) -> str:
    """The line that says what went wrong (torch.onnx puts it under '## Exception summary')."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    cause = next((ln for ln in lines if ln.startswith("<class")), lines[0] if lines else "")
    return cause[:300]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "bench"), default="tiny")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    parser.add_argument("--exporters", nargs="*", default=list(EXPORTERS), choices=EXPORTERS)
    parser.add_argument(
        "--attn",
        default="default",
        choices=("default", "eager", "sdpa"),
        help="attention implementation; default = what transformers picks",
    )
    parser.add_argument(
        "--dynamo-opset",
        type=int,
        default=None,
        help="opset for the dynamo exporter (default: torch's default)",
    )
    parser.add_argument(
        "--golden",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write golden sets (default: on for --size tiny)",
    )
    parser.add_argument(
        "--golden-python",
        default=os.environ.get("ONNXOPT_PYTHON", "/work/venv/bin/python"),
        help="a Python with onnxopt installed, for the golden sets",
    )
    parser.add_argument(
        "--manifest", type=Path, default=None, help="manifest JSON (default: OUT/manifest.json)"
    )
    parser.add_argument(
        "--tables",
        action="store_true",
        help="print the manifest's markdown tables (for the README) and exit",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.tables:
        print(tables(json.loads((args.manifest or args.out / "manifest.json").read_text())))
        return 0
    if args.golden is None:
        args.golden = args.size == "tiny"
    if args.golden and not Path(args.golden_python).exists():
        args.golden_python = sys.executable
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    manifest_path = args.manifest or args.out / "manifest.json"
    previous = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    entries = {(e["model"], e["exporter"]): e for e in previous.get("models", [])}
    failed = 0
    for name in args.models:
        for exporter in args.exporters:
            entry = run_one(name, exporter, args, args.out)
            entries[(name, exporter)] = entry
            if "error" in entry:
                failed += 1
                print(f"{name:17} {exporter:6} FAILED {entry['error']}", flush=True)
                continue
            diff = max(c["max_abs_diff"] for c in entry["check"])
            print(
                f"{name:17} {exporter:6} opset {entry['opset']:2} nodes {entry['nodes']:4} "
                f"{entry['bytes'] / 1024:7.1f} KB  torch diff {diff:.1e}  "
                f"{entry['export_s']:5.1f}s  attention {entry['attention']}",
                flush=True,
            )
    order = {(m, e): i for i, (m, e) in enumerate((m, e) for m in MODELS for e in EXPORTERS)}
    manifest = {
        "size": args.size,
        "seed": SEED,
        "attn": args.attn,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
        },
        "models": sorted(entries.values(), key=lambda e: order[(e["model"], e["exporter"])]),
    }
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
