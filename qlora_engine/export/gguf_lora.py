"""An adapter alone in llama.cpp's LoRA GGUF format, for `llama-server -m base.gguf --lora
adapter.gguf` on a GGUF of the base it was trained on (`qlora export --format gguf-lora`).

Per adapted linear, `<GGUF weight name>.lora_a` = PEFT's A [r, in] and `.lora_b` = B [out, r], in
float32 (exact for bf16-trained adapters); for llama, B of q/k gets the same row permutation as the
base GGUF's q/k weights (`gguf.permute_rows`). llama.cpp requires `general.type = adapter`,
`adapter.type = lora` and the base's architecture. Reads the base's config and the adapter; writes
--out only (atomically, `gguf.atomic_file`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import InputError
from ..machine import fmt_bytes
from ..models.hub import resolve_model
from ..models.loader import BASE_DTYPE
from ..models.tensorfiles import check_not_inside
from .gguf import Tensor, atomic_file, check_out, gguf_arch, gguf_module, permute_heads, permute_rows, write_gguf
from .merge import Adapter, plan_export


def lora_tensors(adapter: Adapter, cfg: dict, arch: str) -> tuple[list[tuple[Tensor, torch.Tensor]], float | None]:
    """([(GGUF tensor, float32 values)], adapter.lora.alpha) of an adapter in llama.cpp's LoRA format.

    llama.cpp computes y = W x + s·B(A x) with s = alpha / rank, one alpha per file. When every
    layer's scale (alpha/r, or alpha/√r with rsLoRA, per PEFT's alpha_pattern) is alpha'/r for one
    alpha', B is written as trained with alpha'; otherwise each B carries its layer's scale and no
    alpha is written (llama.cpp then uses s = 1)."""
    from ..lora.layers import lora_scaling
    from ..lora.peft_format import adapter_alpha

    gguf = gguf_module()
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), int(cfg["num_hidden_layers"]))
    tied = bool(cfg.get("tie_word_embeddings"))
    scales, out = {}, []
    for layer, (A, B) in sorted(adapter.weights.items()):
        name = names.get_name(f"{layer}.weight", try_suffixes=(".weight",))
        kind = adapter.kinds.get(layer, "linear")
        if name is None or kind != "linear":
            raise InputError(f"{adapter.dir}: adapter layer {layer} ({kind}) has no llama.cpp LoRA form here; export the "
                             "merged model instead (--format gguf)")  # fmt: skip
        if name == "output.weight" and tied:
            raise InputError(f"{adapter.dir}: {layer} is adapted but tied to the input embeddings, and a base GGUF has no "
                             "separate output tensor to apply it to; export the merged model instead (--format gguf)")  # fmt: skip
        r = A.shape[0]
        scales[layer] = lora_scaling(adapter_alpha(adapter.config, layer), r, bool(adapter.config.get("use_rslora"))) * r
        out.append((layer, name, A.float(), B.float()))
    alphas = set(round(s, 9) for s in scales.values())
    alpha = next(iter(alphas)) if len(alphas) == 1 else None
    pairs = []
    for layer, name, A, B in out:
        if alpha is None:
            B = B * (scales[layer] / A.shape[0])
        if heads := permute_heads(cfg, arch, name):
            B = permute_rows(B, heads)
        F32 = gguf.GGMLQuantizationType.F32
        pairs.append((Tensor(f"{name}.lora_a", layer, tuple(A.shape), F32), A.contiguous()))
        pairs.append((Tensor(f"{name}.lora_b", layer, tuple(B.shape), F32), B.contiguous()))
    return pairs, alpha


def export_gguf_lora(base_dir: str | Path, adapter_dir: str | Path, out: str | Path, force: bool = False, log=print) -> dict:
    """The adapter alone as a llama.cpp LoRA GGUF (F32), for use on a GGUF of `base_dir`."""
    gguf = gguf_module()
    base, out = resolve_model(base_dir), Path(out)
    check_not_inside(out, {"base model": base, "adapter": Path(adapter_dir)})
    check_out(out, force)
    adapter = Adapter.read(adapter_dir)
    plan = plan_export(base, adapter, BASE_DTYPE)  # checks the adapter fits this base; reads headers only
    arch = gguf_arch(plan.config, base / "config.json")
    pairs, alpha = lora_tensors(adapter, json.loads((base / "config.json").read_text()), arch)  # as the base GGUF has it
    writer = gguf.GGUFWriter(None, arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(Path(adapter_dir).name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    if alpha is not None:
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tensors = [t for t, _ in pairs]
    with atomic_file(out, force) as tmp:
        size = write_gguf(tmp, writer, tensors, ((t, v.numpy()) for t, v in pairs), f"writing {out.name}")
    if adapter.base_kind == "nf4":
        log("note: the adapter was trained on the NF4-quantized base; on a 16-bit base GGUF it runs against other "
            "weights than in training, which moves its outputs further from the trained model than the merged export "
            "(--format gguf) does")  # fmt: skip
    log(f"exported {len(pairs) // 2} LoRA layers to {out} ({fmt_bytes(size)}, F32, "
        f"{'alpha ' + format(alpha, 'g') if alpha is not None else 'scales folded into B'}); "
        f"use: llama-server -m BASE.gguf --lora {out}")  # fmt: skip
    return {"format": "gguf-lora", "base": str(base), "adapter": str(adapter.dir), "out": str(out), "architecture": arch,
            "layers": len(pairs) // 2, "alpha": alpha, "bytes": size, "base_kind": adapter.base_kind}  # fmt: skip
