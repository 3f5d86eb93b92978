"""GGUF for llama.cpp and Ollama, written directly with the `gguf` package (no llama.cpp checkout).

`export_gguf`: the merged model, the same merge as the safetensors export (`merge.plan_export` +
`merge.merged_tensors`: NF4(base) dequantized exactly + scale·B·A, here kept in float32 until the one
conversion to the GGUF type), with llama.cpp's architecture metadata, the tokenizer and chat template
(`gguf_vocab`); without an adapter, the base alone. The adapter alone in llama.cpp's LoRA format is
`gguf_lora`.

Families: llama (SmolLM is one), mistral (llama.cpp's llama architecture) and qwen2. llama.cpp's
llama graph applies RoPE to adjacent pairs, transformers to the two halves of each head, so the
rows of q/k (weights, biases, and an adapter's B) are permuted as llama.cpp's converter does;
qwen2 uses the halves in both and is written as is.

Types (`--gguf-type`): bf16/f16 (2-D weights; norms, biases and 1-D tensors stay float32), q8_0,
q4_0 and q4_k_m, with llama-quantize's per-tensor choice (`tensor_type`): the output embedding (or
the input one it is tied to) in Q6_K, q4_k_m's attn_v and ffn_down in Q6_K in the layers
`use_more_bits` picks; a row length that is no multiple of a type's block falls back as
llama-quantize does (Q4_K -> Q5_0, Q6_K -> Q8_0, else F16). BF16, Q8_0, Q4_0 and Q5_0 come from
`gguf.quants.quantize`, Q4_K and Q6_K from `kquants`.

Writing streams: every tensor's name, shape and type are known from the plan, so the header goes
first and each tensor is computed, converted and written on its own. The file is written under a
temporary name beside --out, fsynced and renamed: a killed export leaves no .gguf. Reads the base
checkpoint and the adapter; writes --out, and beside it `<stem>.export_report.json` and, with
`ollama`, a `Modelfile`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..errors import InputError
from ..machine import fmt_bytes
from ..models.hub import resolve_model
from ..models.loader import BASE_DTYPE, QuantSpec
from ..models import tensorfiles
from ..models.tensorfiles import check_not_inside, named, remove_stale_temporaries, write_text_atomic
from ..progress import Progress
from . import GGUF_TYPES, kquants
from .merge import REPORT, Adapter, merged_tensors, plan_export

ARCHES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # transformers model_type -> llama.cpp architecture
MODELFILE = "Modelfile"
GGUF_MAGIC = b"GGUF"


def gguf_module():
    """The `gguf` package (imported on use, so that `import qlora_engine` stays light)."""
    try:
        import gguf
    except ImportError:
        raise InputError("GGUF export needs the gguf package (a dependency of qlora_engine): pip install gguf") from None
    return gguf


# ----------------------------------------------------------------------------------------- metadata


def file_type(gguf_type: str) -> int:
    """llama.cpp's file type (llama_ftype, the GGUF's general.file_type) of a --gguf-type."""
    return int(gguf_module().LlamaFileType[f"MOSTLY_{gguf_type.upper()}"])


def gguf_arch(config: dict, where) -> str:
    """llama.cpp's architecture for a config.json, or a one-line refusal naming the model type."""
    kind = config.get("model_type")
    if kind not in ARCHES:
        raise InputError(f"{where}: GGUF export supports llama, mistral and qwen2 models (SmolLM is llama), not "
                         f"{kind!r}; export safetensors (--format safetensors) and convert that with llama.cpp's "
                         "convert_hf_to_gguf.py")  # fmt: skip
    return ARCHES[kind]


def _head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def rope_spec(cfg: dict) -> tuple[float, dict]:
    """(rope_theta, scaling spec) from a transformers 4 (`rope_theta`, `rope_scaling`) or 5
    (`rope_parameters`) config."""
    params = dict(cfg.get("rope_parameters") or {})
    params.update(cfg.get("rope_scaling") or {})
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    return float(theta), params


def rope_kind(spec: dict) -> str:
    return spec.get("rope_type", spec.get("type", "default")) or "default"


def llama3_rope_factors(cfg: dict) -> np.ndarray:
    """llama.cpp's `rope_freqs` for Llama 3.1-style RoPE scaling: per frequency of a head, the
    divisor of that frequency (1 for short wavelengths, `factor` for long ones, and a smooth blend
    between `original_max_position_embeddings`/`high_freq_factor` and .../`low_freq_factor`)."""
    theta, spec = rope_spec(cfg)
    dim = _head_dim(cfg)
    factor, low, high = float(spec["factor"]), float(spec.get("low_freq_factor", 1.0)), float(spec.get("high_freq_factor", 4.0))
    old_len = float(spec.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * np.pi / freqs
    smooth = (old_len / wavelen - low) / (high - low)
    out = np.where(wavelen < old_len / high, 1.0,
                   np.where(wavelen > old_len / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))  # fmt: skip
    return out.astype(np.float32)


def add_hparams(writer, cfg: dict, arch: str, n_vocab: int, where) -> None:
    """The `{arch}.*` keys llama.cpp reads for a llama or qwen2 model."""
    gguf = gguf_module()
    heads = cfg["num_attention_heads"]
    writer.add_context_length(int(cfg["max_position_embeddings"]))
    writer.add_embedding_length(int(cfg["hidden_size"]))
    writer.add_block_count(int(cfg["num_hidden_layers"]))
    writer.add_feed_forward_length(int(cfg["intermediate_size"]))
    writer.add_head_count(int(heads))
    writer.add_head_count_kv(int(cfg.get("num_key_value_heads") or heads))
    writer.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    theta, spec = rope_spec(cfg)
    writer.add_rope_freq_base(theta)  # absent, llama.cpp would assume 10000 (SmolLM2 uses 100000)
    if cfg.get("head_dim"):
        writer.add_key_length(int(cfg["head_dim"]))
        writer.add_value_length(int(cfg["head_dim"]))
    if arch == "llama":
        writer.add_vocab_size(n_vocab)
        writer.add_rope_dimension_count(_head_dim(cfg))
    kind = rope_kind(spec)
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(spec["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(spec["factor"]))
        # transformers' default for a YaRN config without it: the context length itself
        writer.add_rope_scaling_orig_ctx_len(int(spec.get("original_max_position_embeddings") or cfg["max_position_embeddings"]))
    elif kind not in ("default", "llama3"):  # llama3: the rope_freqs tensor
        raise InputError(f"{where}: RoPE scaling {kind!r} has no GGUF equivalent here (linear, yarn and llama3 do)")


# ----------------------------------------------------------------------------------------- tensors


@dataclasses.dataclass
class Tensor:
    """One tensor of the GGUF file: its name, where its values come from, shape (torch order),
    type, and the head count for the llama q/k row permutation (None: none)."""

    name: str
    source: str | None  # the merge plan's tensor name; None: computed here (rope_freqs)
    shape: tuple[int, ...]
    qtype: int
    heads: int | None = None

    @property
    def nbytes(self) -> int:
        block, size = gguf_module().GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape[:-1], dtype=np.int64)) * (self.shape[-1] // block) * size


def use_more_bits(layer: int, n_layer: int) -> bool:
    """llama-quantize's choice of the layers that get more bits in the *_M types."""
    return layer < n_layer // 8 or layer >= 7 * n_layer // 8 or (layer - n_layer // 8) % 3 == 2


def tensor_type(name: str, shape: tuple[int, ...], gguf_type: str, n_layer: int, tied: bool) -> int:
    """The GGML type of one tensor in a file of `gguf_type`, as llama.cpp's converter (bf16, f16,
    q8_0) or llama-quantize (q4_0, q4_k_m) would choose it."""
    T = gguf_module().GGMLQuantizationType
    if len(shape) < 2 or not name.endswith(".weight") or name.endswith("_norm.weight"):
        return T.F32
    if gguf_type in ("bf16", "f16"):
        return T.BF16 if gguf_type == "bf16" else T.F16
    base = {"q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_k_m": T.Q4_K}[gguf_type]
    want, layer = base, int(name.split(".")[1]) if name.startswith("blk.") else -1
    if gguf_type != "q8_0" and (name == "output.weight" or (tied and name == "token_embd.weight")):
        want = T.Q6_K
    elif gguf_type == "q4_k_m" and name.endswith((".attn_v.weight", ".ffn_down.weight")) and use_more_bits(layer, n_layer):
        want = T.Q6_K
    cols = shape[-1]
    if cols % gguf_module().GGML_QUANT_SIZES[want][0]:
        want = {T.Q4_K: T.Q5_0, T.Q6_K: T.Q8_0}.get(want, T.F16)
        if cols % gguf_module().GGML_QUANT_SIZES[want][0]:
            want = T.F16
    return want


def gguf_tensors(plan, arch: str, gguf_type: str) -> list[Tensor]:
    """The file's tensors, in the merge plan's order; one-line errors for names llama.cpp has none for."""
    gguf = gguf_module()
    cfg = plan.config
    n_layer = int(cfg["num_hidden_layers"])
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), n_layer)
    tied = bool(cfg.get("tie_word_embeddings")) or all(i.name != "lm_head.weight" for i in plan.items)
    out: list[Tensor] = []
    spec = rope_spec(cfg)[1]
    if rope_kind(spec) == "llama3":
        out.append(Tensor("rope_freqs.weight", None, (_head_dim(cfg) // 2,), gguf.GGMLQuantizationType.F32))
    for item in plan.items:
        if item.name.endswith("rotary_emb.inv_freq") or (tied and item.name == "lm_head.weight"):
            continue  # recomputed by llama.cpp / the tied head reuses token_embd
        name = names.get_name(item.name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise InputError(f"{plan.base}: tensor {item.name} has no llama.cpp {arch} name; GGUF export covers the "
                             "standard llama/mistral/qwen2 layouts")  # fmt: skip
        shape = tuple(item.shape)
        out.append(Tensor(name, item.name, shape, tensor_type(name, shape, gguf_type, n_layer, tied),
                          permute_heads(cfg, arch, name)))  # fmt: skip
    return out


def permute_heads(cfg: dict, arch: str, name: str) -> int | None:
    """For llama.cpp tensor `name` (or the LoRA B of it): the heads its rows are permuted over
    (`permute_rows`: q and k weights and biases of the llama architecture), else None."""
    if arch != "llama" or not re.search(r"\.attn_[qk]\.(weight|bias)$", name):
        return None
    heads = cfg["num_attention_heads"]
    return heads if ".attn_q." in name else cfg.get("num_key_value_heads") or heads


def permute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k weight, bias or LoRA B from transformers' RoPE layout (per head: the first
    half of the rows pairs with the second) to llama.cpp's (per head: rows 2i, 2i+1 pair):
    new row h·d + 2i + p = old row h·d + p·d/2 + i."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def encode(values: np.ndarray, qtype: int) -> np.ndarray:
    """float32 values -> the array GGUFWriter writes for `qtype` (float arrays or block bytes)."""
    gguf = gguf_module()
    T = gguf.GGMLQuantizationType
    if qtype == T.F32:
        return np.ascontiguousarray(values, dtype=np.float32)
    if qtype == T.F16:
        return values.astype(np.float16)
    if qtype == T.Q4_K:
        return kquants.quantize_q4_K(values)
    if qtype == T.Q6_K:
        return kquants.quantize_q6_K(values)
    return gguf.quants.quantize(values, qtype)


# ----------------------------------------------------------------------------------------- writing


def check_out(out: Path, force: bool) -> None:
    """`out` may be written: not a directory; when it exists, only with `force` and only a GGUF file."""
    out = Path(out)
    if out.is_dir():
        raise InputError(f"--out {out} is a directory; a GGUF export is one file: give a path such as {out / 'model.gguf'}")
    if out.exists() or out.is_symlink():
        if not force:
            raise InputError(f"{out} already exists: choose another --out or pass --force to replace it")
        with open(out, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise InputError(f"{out} exists and is not a GGUF file: refusing to replace it, even with --force; "
                                 "choose another --out")  # fmt: skip


@contextlib.contextmanager
def atomic_file(out: Path, force: bool) -> Iterator[Path]:
    """A temporary path beside `out`, renamed to `out` once the block succeeds (fsynced first).
    An existing `out` is refused unless `force`, and even then unless it is a GGUF file."""
    out = Path(out)
    check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    with tensorfiles.atomic_file(out) as tmp:
        yield tmp


def write_gguf(path: Path, writer, tensors: list[Tensor], values: Iterator[tuple[Tensor, np.ndarray]], desc: str) -> int:
    """Header, metadata and tensor infos of `writer` into `path`, then each tensor's data as
    `values` yields it (in `tensors` order); returns the file size."""
    for t in tensors:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    try:
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        bar = Progress(len(tensors), desc, "tensors")
        written = 0
        for t, data in values:
            writer.write_tensor_data(data)
            written += 1
            bar.update()
        bar.close()
        if written != len(tensors):  # the header promised them all: never rename a short file into place
            raise RuntimeError(f"{path}: {written} of {len(tensors)} tensors were produced")
        writer.flush()  # atomic_file fsyncs it
    except OSError as e:
        raise named(e, path) from None
    finally:
        writer.close()
    return path.stat().st_size


_CHUNK = 1 << 21  # values converted at a time: float32 temporaries of a few MiB, even for the embeddings


def convert(w: torch.Tensor, qtype: int, stats: dict | None = None) -> np.ndarray:
    """`encode` of a tensor, a block of rows at a time, so that no float32 copy of a whole large
    tensor is made; with `stats`, adds the squared error of the conversion and the squared values."""
    gguf = gguf_module()
    if w.dim() < 2:
        return encode(w.float().numpy(), qtype)
    w = w.reshape(w.shape[0], -1)
    step = max(1, _CHUNK // w.shape[1])
    same = qtype == gguf.GGMLQuantizationType.BF16 and w.dtype == torch.bfloat16  # already the bytes to write
    out = w.contiguous().view(torch.int16).numpy().view(np.uint8) if same else None
    for i in range(0, w.shape[0], step):
        values = w[i : i + step].float().numpy()
        data = out[i : i + step] if same else encode(values, qtype)
        if out is None:
            out = np.empty((w.shape[0], *data.shape[1:]), dtype=data.dtype)
        if not same:
            out[i : i + step] = data
        if qtype == gguf.GGMLQuantizationType.F16 and not np.isfinite(data).all():
            raise InputError("a weight exceeds float16's range (±65504): export with --gguf-type bf16 instead")
        if stats is not None:
            diff = gguf.quants.dequantize(data, qtype).reshape(values.shape).astype(np.float64) - values
            stats["sq_err"] += float(np.einsum("ij,ij->", diff, diff))
            stats["sq_ref"] += float(np.einsum("ij,ij->", values, values, dtype=np.float64))
    return out


def _merged_values(plan, adapter: Adapter, tensors: list[Tensor], device, stats: dict) -> Iterator[tuple[Tensor, np.ndarray]]:
    """Each GGUF tensor's data: the merged tensor, permuted where llama needs it, converted;
    `stats` gathers the weights' squared error of the conversion (the 2-D weights only)."""
    by_source = {t.source: t for t in tensors if t.source}
    for t in tensors:
        if t.source is None:  # computed tensors come first in `tensors`
            yield t, llama3_rope_factors(plan.config)
    for name, w in merged_tensors(plan, adapter, device):
        t = by_source.get(name)
        if t is None:
            continue
        if t.heads:
            w = permute_rows(w, t.heads)
        yield t, convert(w, t.qtype, stats if len(t.shape) == 2 else None)


def _type_counts(tensors: list[Tensor]) -> dict[str, int]:
    names = [gguf_module().GGMLQuantizationType(t.qtype).name for t in tensors]
    return {n: names.count(n) for n in sorted(set(names))}


def _no_adapter(base: Path) -> Adapter:
    """An adapter of no layers on the 16-bit weights: the merge plan then copies the base as it is."""
    return Adapter(base, {"lora_alpha": 1}, {}, "bf16", QuantSpec(64, "nf4", True), False)


def export_gguf(base_dir: str | Path, adapter_dir: str | Path | None, out: str | Path, gguf_type: str = "bf16",
                force: bool = False, device="cpu", report: bool = True, ollama: bool = False, log=print) -> dict:  # fmt: skip
    """Merge `adapter_dir` onto `base_dir` (as the safetensors export does) into the GGUF file `out`,
    atomically; with `report` and llama_cpp importable, also compare the file in llama.cpp with the
    trained model (`llamacpp.gguf_fidelity`). Returns the report (written beside `out`). Without an
    adapter, the base itself is written (a base GGUF for `export_gguf_lora`'s adapters)."""
    from .gguf_vocab import add_vocab

    gguf = gguf_module()
    if gguf_type not in GGUF_TYPES:
        raise InputError(f"--gguf-type {gguf_type!r}: choose one of {', '.join(GGUF_TYPES)}")
    base, out, device = resolve_model(base_dir), Path(out), torch.device(device)
    check_not_inside(out, {"base model": base, **({"adapter": Path(adapter_dir)} if adapter_dir else {})})
    check_out(out, force)
    adapter = Adapter.read(adapter_dir) if adapter_dir else _no_adapter(base)
    plan = plan_export(base, adapter, BASE_DTYPE)
    # merged weights (dequantized NF4 + update) stay float32 until the one conversion to the GGUF
    # type; copied tensors keep the bf16 values the trained model held (no float32 copy of them)
    plan.items = [dataclasses.replace(i, dtype=torch.float32) if i.kind != "copy" else i for i in plan.items]
    arch = gguf_arch(plan.config, base / "config.json")
    tensors = gguf_tensors(plan, arch, gguf_type)
    n_vocab = next(t.shape[0] for t in tensors if t.name == "token_embd.weight")
    sidecar = out.with_name(f"{out.stem}.{REPORT}")
    modelfile = out.with_name(MODELFILE)
    if ollama and modelfile.exists() and not force:
        raise InputError(f"{modelfile} already exists: choose another --out directory or pass --force to replace it")

    writer = gguf.GGUFWriter(None, arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(f"{base.name} + {Path(adapter_dir).name}" if adapter_dir else base.name)
    add_hparams(writer, plan.config, arch, n_vocab, base / "config.json")
    writer.add_file_type(file_type(gguf_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab = add_vocab(writer, base, n_vocab)
    if plan.config.get("model_type") == "mistral" and plan.config.get("sliding_window"):
        log(f"note: llama.cpp's llama architecture attends over the whole context; Mistral's sliding window of "
            f"{plan.config['sliding_window']} tokens is not applied (as with llama.cpp's own converter)")  # fmt: skip
    for note in plan.notes:
        log(f"note: {note}")

    info = {"format": "gguf", "base": str(base), "adapter": str(adapter_dir) if adapter_dir else None, "out": str(out), "gguf_type": gguf_type,
            "architecture": arch, "base_kind": adapter.base_kind, "tensor_types": _type_counts(tensors),
            "tokenizer": vocab}  # fmt: skip
    stats = {"sq_err": 0.0, "sq_ref": 0.0}
    with atomic_file(out, force) as tmp:
        t0 = time.perf_counter()
        info["bytes"] = write_gguf(tmp, writer, tensors, _merged_values(plan, adapter, tensors, device, stats),
                                   f"exporting to {out.name}")  # fmt: skip
        info["seconds"] = round(time.perf_counter() - t0, 2)
    info["weight_rel_rmse"] = (stats["sq_err"] / stats["sq_ref"]) ** 0.5 if stats["sq_ref"] else 0.0
    log(f"exported {len(tensors)} tensors to {out} ({fmt_bytes(info['bytes'])}, {gguf_type}: "
        f"{', '.join(f'{n} {k}' for k, n in info['tensor_types'].items())}) in {info['seconds']:.1f} s; "
        f"weights' relative RMS error of the conversion {info['weight_rel_rmse']:.2e}")  # fmt: skip
    if ollama:
        write_text_atomic(modelfile, modelfile_text(out, base))
        info["modelfile"] = str(modelfile)
        log(f"wrote {modelfile}: ollama create NAME -f {modelfile}")
    if report:
        from . import llamacpp

        if llamacpp.available():
            info["llama_cpp"] = llamacpp.gguf_fidelity(out, base, adapter_dir, device=device)
            log(llamacpp.format_fidelity(info["llama_cpp"]))
        else:
            info["llama_cpp"] = None
            log("llama.cpp check skipped: llama_cpp is not importable (pip install llama-cpp-python to compare the "
                "file in llama.cpp itself)")  # fmt: skip
    write_text_atomic(sidecar, json.dumps(info, indent=2) + "\n")
    return info


# ----------------------------------------------------------------------------------------- Ollama


def modelfile_text(gguf_path: Path, base: Path) -> str:
    """An Ollama Modelfile for `gguf_path`: FROM, the chat template as a Go TEMPLATE when it is
    ChatML (Ollama reads other templates from the GGUF's tokenizer.chat_template), the system
    prompt the template adds by default, and the end-of-turn tokens as stop words."""
    from ..models.hub import load_tokenizer

    tok = load_tokenizer(base)
    lines = [f"FROM ./{Path(gguf_path).name}"]
    stops = [t for t in (tok.eos_token,) if t]
    template = getattr(tok, "chat_template", None)
    if template and "<|im_start|>" in template:
        rendered = tok.apply_chat_template([{"role": "user", "content": "\x00"}], tokenize=False, add_generation_prompt=True)
        m = re.match(r"<\|im_start\|>system\n(.*?)<\|im_end\|>\n", rendered, re.S)
        if m:
            lines.append(f'SYSTEM """{m.group(1)}"""')
        lines.append('TEMPLATE """{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
                     '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
                     '<|im_start|>assistant\n"""')  # fmt: skip
        stops += ["<|im_end|>", "<|im_start|>"]
    else:
        lines.append("# TEMPLATE: none given; Ollama takes the chat template from the GGUF (tokenizer.chat_template)")
    lines += [f'PARAMETER stop "{s}"' for s in dict.fromkeys(stops)]
    return "\n".join(lines) + "\n"
