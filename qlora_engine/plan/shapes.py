"""Model shapes for the memory planner: `load_shape`, which turns any model description (a preset
name, a config dict, a bare `config.json`, a checkpoint directory) into a `ModelShape`, and
`block_activations`, what one decoder block of a shape keeps for backward. Everything
architecture-specific lives here; `memory` only adds blocks, phases and devices up.

The decoder-block structure is not guessed from the config: one block is built on the meta device
with transformers and walked the way the loader and LoRA walk a real model
(`models.structure`, `lora.inject.target_names`), so the planner sees exactly the linears the
engine quantizes and adapts, and the attention path training would pick. Touches transformers and
accelerate (meta device only), never the network or CUDA.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .presets import ShapeError, normalize_name, preset_config

# What the planner cannot do without: the names of the config.json fields.
REQUIRED = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


@dataclass(frozen=True)
class Linear:
    """One linear layer of a decoder block, named relative to the block (`self_attn.q_proj`)."""

    name: str
    in_features: int
    out_features: int
    bias: bool


@dataclass
class ModelShape:
    """Everything the memory model needs to know about a model; one decoder block stands for all."""

    name: str
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tie_embeddings: bool
    max_positions: int | None
    final_logit_softcapping: float | None
    attn_logit_softcapping: float | None
    sliding_window: int | None
    linears: tuple[Linear, ...]  # one block, in module order
    norms_per_layer: int  # RMSNorm calls on the [tokens, hidden] stream per block
    head_norms: tuple[int, ...]  # widths of per-head norms (q_norm/k_norm) applied per block
    norm_scale_fp32: bool  # Gemma's norm multiplies by (1 + w) in fp32: one [hidden] fp32 saved per call
    fused_qkv: bool
    fused_gate_up: bool
    attn_impl: str  # "varlen" (ours), "sdpa" or "eager" (transformers' own, for sliding window / soft-capping)
    block_dense_elems: int  # 16-bit parameters per block other than linear weights (norms, biases)
    outer_dense_elems: int  # 16-bit parameters outside the blocks (embeddings, untied lm_head, final norm)
    buffer_bytes: int  # buffers (rotary inv_freq), whole model
    _meta: object = field(default=None, repr=False, compare=False)  # the one-block meta model, for target selection
    _targets: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def target_linears(self, target_modules="all-linear") -> tuple[Linear, ...]:
        """The linears of one block that LoRA adapts, chosen by `lora.target_names` itself."""
        key = json.dumps(target_modules)
        if key not in self._targets:
            from ..lora import inject as lora
            from ..models.structure import decoder_layers

            prefix, _ = decoder_layers(self._meta)
            head = f"{prefix}.0."
            names = {n[len(head):] for n in lora.target_names(self._meta, target_modules) if n.startswith(head)}
            outside = [n for n in lora.target_names(self._meta, target_modules) if not n.startswith(prefix + ".")]
            if outside:
                raise ShapeError(f"target_modules selects {outside[0]}, outside the decoder blocks; the chunked "
                                 "loss needs lm_head frozen and the planner models adapters inside the blocks only")
            self._targets[key] = tuple(lin for lin in self.linears if lin.name in names)
        return self._targets[key]


def read_config(spec) -> tuple[str, dict]:
    """(display name, config dict) from a preset name, a config dict, a transformers config, a
    config.json file or a checkpoint directory."""
    if isinstance(spec, dict):
        return spec.get("_name_or_path") or spec.get("model_type", "model"), dict(spec)
    if hasattr(spec, "to_dict"):
        return getattr(spec, "name_or_path", "") or spec.model_type, spec.to_dict()
    path = Path(str(spec)).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.exists():
            raise ShapeError(f"{path.parent}: no config.json here; give a checkpoint directory, a config.json "
                             "or a preset name")
    if path.suffix == ".json" or path.exists():
        if not path.exists():
            raise ShapeError(f"{path}: no such file")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ShapeError(f"{path} is not valid JSON (line {e.lineno}): restore it from the original checkpoint") from None
        if not isinstance(data, dict):
            raise ShapeError(f"{path} must hold a JSON object")
        name = path.parent.name if path.name == "config.json" else path.stem
        return name, data
    return normalize_name(str(spec)), preset_config(str(spec))


def _text_config(data: dict) -> dict:
    """Multimodal configs nest the language model under text_config."""
    return {**data, **data["text_config"]} if isinstance(data.get("text_config"), dict) else data


def _meta_block_model(data: dict):
    """The model with ONE decoder block, built on the meta device (no memory), as the loader builds it."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    drop = ("model_type", "layer_types", "architectures", "quantization_config")
    kw = {k: v for k, v in data.items() if k not in drop}
    kw["num_hidden_layers"] = 1
    try:
        config = AutoConfig.for_model(data["model_type"], **kw)
    except (ValueError, KeyError) as e:
        first = str(e).splitlines()[0]
        raise ShapeError(f"transformers cannot build a {data['model_type']!r} config from this: {first}") from None
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def _attn_impl(data: dict, model) -> str:
    """The path `attention.use_varlen` takes: ours unless sliding window or soft-capping is on."""
    if data.get("sliding_window") or data.get("attn_logit_softcapping"):
        impl = getattr(model.config, "_attn_implementation", None) or "eager"
        return "sdpa" if impl == "sdpa" else "eager"
    return "varlen"


def shape_from_config(name: str, data: dict) -> ModelShape:
    """Read a config dict into a ModelShape; a one-line ShapeError names what is missing."""
    from torch import nn

    from ..models.structure import decoder_layers

    data = _text_config(data)
    missing = [k for k in REQUIRED if data.get(k) in (None, "")]
    if missing:
        raise ShapeError(f"{name}: config.json lacks {', '.join(missing)}, which the memory plan needs")
    model = _meta_block_model(data)
    cfg = model.config
    _, blocks = decoder_layers(model)
    block = blocks[0]
    hidden = int(data["hidden_size"])
    linears, norms, head_norms, dense = [], 0, [], 0
    for mname, mod in block.named_modules():
        if isinstance(mod, nn.Linear):
            linears.append(Linear(mname, mod.in_features, mod.out_features, mod.bias is not None))
            dense += 0 if mod.bias is None else mod.bias.numel()
        elif "norm" in type(mod).__name__.lower() and getattr(mod, "weight", None) is not None:
            dense += mod.weight.numel()
            if mod.weight.numel() == hidden:
                norms += 1
            else:
                head_norms.append(mod.weight.numel())
    names = {lin.name.rsplit(".", 1)[-1] for lin in linears}
    if not ({"gate_proj", "up_proj", "down_proj"} <= names or {"gate_up_proj", "down_proj"} <= names):
        raise ShapeError(f"{name}: the planner models gated-MLP decoders (llama, mistral, qwen2, gemma2, phi3 ...); "
                         f"this block has {sorted(names)}")  # fmt: skip
    block_params = {id(p) for p in block.parameters()}
    outer = {id(p): p.numel() for p in model.parameters() if id(p) not in block_params}
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if getattr(model.config, "tie_word_embeddings", False) and head is not None and head.weight is not emb.weight:
        outer.pop(id(head.weight), None)  # the loader ties lm_head to the embedding; meta models are not tied yet
    buffers = sum(b.numel() * b.element_size() for b in model.buffers() if not b.is_meta)
    heads = int(data["num_attention_heads"])
    layers = int(data["num_hidden_layers"])
    return ModelShape(
        name=name, model_type=data["model_type"], hidden=hidden, intermediate=int(data["intermediate_size"]),
        layers=layers, heads=heads, kv_heads=int(data.get("num_key_value_heads") or heads),
        head_dim=int(getattr(cfg, "head_dim", None) or hidden // heads), vocab=int(data["vocab_size"]),
        tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        max_positions=data.get("max_position_embeddings"),
        final_logit_softcapping=data.get("final_logit_softcapping") or None,
        attn_logit_softcapping=data.get("attn_logit_softcapping") or None,
        sliding_window=getattr(cfg, "sliding_window", None) or None,
        linears=tuple(linears), norms_per_layer=norms, head_norms=tuple(head_norms),
        norm_scale_fp32=data["model_type"].startswith("gemma"),
        fused_qkv="qkv_proj" in names, fused_gate_up="gate_up_proj" in names,
        attn_impl=_attn_impl(data, model), block_dense_elems=dense, outer_dense_elems=sum(outer.values()),
        buffer_bytes=buffers, _meta=model,
    )  # fmt: skip


@dataclass
class BlockActivations:
    """Activation terms of one decoder block (bytes), by what saves them; plus its working sets."""

    saved: dict
    after_attention: int  # of `saved`, what the backward frees before it reaches the attention
    first_layer_norm: int  # the input norm saves nothing in block 0 without checkpointing (frozen embedding input)
    rotary: int  # cos + sin, shared by every block
    masks: int  # attention masks built once per forward (sdpa/eager paths), kept alive by checkpointing closures
    fwd_work: int  # temporaries of one block's forward (dequantized W, unsaved outputs, dropout)
    bwd_work: int  # temporaries of the MLP backward (gradients of [tokens, intermediate] tensors, dequantized W)
    attn_work: int  # temporaries of the attention backward (flash dq accumulator and dk/dv, or eager's T² grads)


def block_activations(shape: ModelShape, batch: int, seq: int, rank: int, targets="all-linear", dropout: float = 0.0,
                      device: str = "cuda", packing: bool = True, base: str = "nf4") -> BlockActivations:
    """What one decoder block keeps for backward and its peak temporaries, for B x T tokens.

    Saved (deduplicated by storage, as autograd holds them): every RMSNorm call an fp32 copy of its
    input and the fp32 rsqrt; each LoRA layer its input x (shared by q/k/v and by gate/up) and
    h = x·Aᵀ [M, r], on the CPU also the bool dropout mask; rotary the rotated q and k; attention
    v, the output and the fp32 log-sum-exp (flash / CPU flash), or the [B, heads, T, T] probabilities
    (eager); the gated MLP gate, act(gate) and up; down_proj its input.
    """
    B, T, H, I, r = batch, seq, shape.hidden, shape.intermediate, rank
    M, q, kv, nh, a = B * T, shape.q_dim, shape.kv_dim, shape.heads, 2  # activations are bf16
    tgt = {x.name.rsplit(".", 1)[-1]: x for x in shape.target_linears(targets)}
    s: dict[str, int] = {}
    norm_call = M * H * 4 + M * 4 + (H * 4 if shape.norm_scale_fp32 else 0)
    s["norms (fp32 input copy + rsqrt)"] = shape.norms_per_layer * norm_call
    if shape.head_norms:
        s["q/k norms"] = M * (q + kv) * 4 + M * (nh + shape.kv_heads) * 4
    if tgt.keys() & {"q_proj", "k_proj", "v_proj", "qkv_proj"}:
        s["LoRA input: attention norm out"] = M * H * a
    if tgt.keys() & {"gate_proj", "up_proj", "gate_up_proj"}:
        s["LoRA input: MLP norm out"] = M * H * a
    if "down_proj" in tgt:
        s["LoRA input: act(gate) * up"] = M * I * a
    s["LoRA h = x·Aᵀ"] = len(tgt) * M * r * a
    if dropout > 0 and device == "cpu":
        s["LoRA dropout masks (bool, CPU only)"] = sum(M * x.in_features for x in tgt.values())
    gqa = shape.kv_heads != shape.heads
    windowed = bool(shape.sliding_window and T > shape.sliding_window)
    eager = shape.attn_impl == "eager"
    masked = eager or (shape.attn_impl == "sdpa" and (packing or B > 1 or windowed))
    # transformers repeats k/v heads whenever a mask goes to SDPA, and always for eager; from a single
    # kv head the repeat is an expand, a view
    repeat = gqa and masked and shape.kv_heads > 1
    s["q (rotated)"] = M * q * a
    s["k (rotated)" + (", heads repeated" if repeat else "")] = M * (q if repeat else kv) * a
    if shape.fused_qkv:
        s["qkv_proj output (v is a view of it)"] = M * (q + 2 * kv) * a
    else:
        s["v" + (", heads repeated" if repeat else "")] = M * (q if repeat else kv) * a
    o_lora = "o_proj" in tgt
    T2 = B * nh * T * T
    if shape.attn_impl == "eager":
        probs = 2 + 4 + (2 if shape.attn_logit_softcapping else 0)  # bf16 probs, fp32 softmax out, bf16 tanh out
        s["attention probabilities (eager, B x heads x T x T)"] = T2 * probs
        if o_lora:
            s["LoRA input: attention out"] = M * q * a
        # backward: the probabilities' grad cast to fp32 and the fp32 softmax-backward result, both
        # [B, heads, T, T], while the tanh and softmax outputs are still held; grads of q, k, v
        attn_work = T2 * 8 + 3 * M * q * a
    else:
        s["attention out + fp32 log-sum-exp"] = M * q * a + M * nh * 4
        if masked:
            s["SDPA mask as bf16 bias (per layer)"] = B * T * T * a
        shared = shape.attn_impl == "sdpa" or (B == 1 and not packing)  # one SDPA call: out feeds o_proj as is
        if o_lora and not shared:
            s["LoRA input: attention out"] = M * q * a
        # flash backward: fp32 dq accumulator, dq/dk/dv, GQA-expanded dk/dv before the head sum, fp32 softmax_d
        attn_work = M * q * 4 + M * (q + 2 * kv) * a + (2 * M * q * a if gqa else 0) + M * nh * 4
        if masked:
            attn_work += B * T * T * a
    gate = M * 2 * I * a if shape.fused_gate_up else 2 * M * I * a
    s["MLP gate, up (act input)" if not shape.fused_gate_up else "MLP gate_up output"] = gate
    s["MLP act(gate)"] = M * I * a
    # Dequantized weight of the largest linear: the CUDA path dequantizes to bf16 then cuBLAS; the CPU
    # reference holds fp32 codes, fp32 scaled values and the bf16 result (10 bytes per element).
    w_max = max(x.in_features * x.out_features for x in shape.linears)
    w_tmp = 0 if base == "bf16" else w_max * (a if device == "cuda" else 10)
    widest = max(x.out_features for x in shape.linears)
    in_max = max((x.in_features for x in tgt.values()), default=0)
    drop_f = drop_b = 0
    if dropout > 0:  # mask: fp32 uniforms + bool (regenerated in backward on CUDA), x * 1/(1-p), where()
        drop_f = M * in_max * (4 + 1 + 2 * a) if device == "cuda" else M * in_max * (4 + 2 * a)
        drop_b = drop_f if device == "cuda" else M * in_max * 2 * a
    fwd_work = max(w_tmp + M * widest * a, 2 * M * widest * a) + 2 * M * H * a + drop_f
    if shape.attn_impl == "eager":
        fwd_work = max(fwd_work, T2 * 2 * a)  # two bf16 score tensors in flight (scaled / capped / masked)
    bwd_work = max(3 * M * I * a, 2 * M * I * a + w_tmp) + 2 * M * H * a + drop_b
    if shape.fused_gate_up:
        bwd_work += 2 * M * I * a  # the [M, 2I] gradient of gate_up is assembled from its two halves
    rotary = 2 * B * T * shape.head_dim * a
    # masks are built once per forward: bool for SDPA, an additive bf16 one for eager; sliding + full layers: two
    n_masks = 0 if shape.attn_impl == "varlen" or not masked else 1 + bool(shape.sliding_window and eager)
    # freed before the attention's own backward runs: the MLP's tensors, the norms after the
    # attention (all but the input norm), o_proj's input and the MLP/o_proj LoRA h
    later = ("MLP", "LoRA input: MLP", "LoRA input: act", "LoRA input: attention out")
    after_attn = sum(v for key, v in s.items() if key.startswith(later)) + (shape.norms_per_layer - 1) * norm_call
    after_attn += M * r * a * len(tgt.keys() & {"o_proj", "gate_proj", "up_proj", "gate_up_proj", "down_proj"})
    masks = n_masks * B * T * T * (a if eager else 1)
    return BlockActivations(s, after_attn, norm_call, rotary, masks, fwd_work, bwd_work, attn_work)


_CACHE: dict[str, ModelShape] = {}


def load_shape(spec) -> ModelShape:
    """A ModelShape from a preset name, config dict/object, config.json path or checkpoint directory (cached)."""
    if isinstance(spec, ModelShape):
        return spec
    name, data = read_config(spec)
    key = json.dumps(data, sort_keys=True, default=str)
    if key not in _CACHE:
        _CACHE[key] = shape_from_config(name, data)
    return _CACHE[key]
