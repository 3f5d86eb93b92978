"""The base's weights in a run: weight_pipeline / offload_base as the recipe resolves them (explicit,
"auto" through the registered planner, off under FSDP with a message), the offloading placer, and
whole runs with the pipeline and the offloaded base giving the same losses and adapter bytes."""

import pytest
import torch

from qlora_engine.errors import InputError
from qlora_engine.lora import peft_format
from qlora_engine.models import loader
from qlora_engine.quant.linear import NF4Linear
from qlora_engine.quant.pipeline import PARTS
from qlora_engine.run import finetune
from qlora_engine.train import config, weights

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def cfg_of(**kw):
    return config.from_dict(kw)


def test_explicit_settings_and_the_cpu_default():
    w = weights.resolve(cfg_of(), "unused", CPU)
    assert (w.pipeline, w.offload, w.quiet) == (False, False, True) and w.attach(None) is None
    w = weights.resolve(cfg_of(weight_pipeline=True), "unused", CPU)
    assert (w.pipeline, w.offload) == (True, False) and w.placer is None
    w = weights.resolve(cfg_of(offload_base=True), "unused", CPU)  # weight_pipeline auto: the offload needs it
    assert (w.pipeline, w.offload) == (True, True) and isinstance(w.placer, weights.OffloadPlacer)


def test_off_under_fsdp_and_for_a_16bit_base_saying_so_when_asked():
    w = weights.resolve(cfg_of(weight_pipeline=True, offload_base=True), "unused", CUDA, fsdp=True)
    assert (w.pipeline, w.offload) == (False, False)
    line = w.attach(None)
    assert line.startswith("weight pipeline: off (under FSDP") and "ignored" in line
    assert weights.resolve(cfg_of(), "unused", CUDA, fsdp=True).attach(None) is None  # not asked: nothing to say
    w = weights.resolve(cfg_of(base="bf16", weight_pipeline=True), "unused", CPU)
    assert not w.pipeline and "the base is bf16" in w.attach(None)


def test_auto_asks_the_registered_planner(monkeypatch):
    asked = []

    def planner(cfg, model, device, processes):
        asked.append((model, device, processes))
        return True, False, "weight_pipeline auto: on: the plan has room for its buffer"

    monkeypatch.setattr(weights, "_planner", [planner])
    w = weights.resolve(cfg_of(), "ckpt-dir", CUDA, processes=2)
    assert (w.pipeline, w.offload) == (True, False) and "room" in w.why and asked == [("ckpt-dir", CUDA, 2)]
    w = weights.resolve(cfg_of(weight_pipeline=False, offload_base=False), "ckpt-dir", CUDA)  # both false: no question
    assert not w.pipeline and len(asked) == 1
    monkeypatch.setattr(weights, "_planner", [])
    w = weights.resolve(cfg_of(), "ckpt-dir", CUDA)
    assert not w.pipeline and "no memory plan" in w.why


def test_the_planner_registers_itself():
    from qlora_engine.plan import memory

    assert weights._planner == [memory.recipe_choice]


def test_offload_without_the_pipeline_is_one_line():
    with pytest.raises(InputError, match="offload_base true copies the base through the weight pipeline") as e:
        cfg_of(offload_base=True, weight_pipeline=False)
    assert "\n" not in str(e.value)


def test_the_offload_placer_keeps_nf4_layers_on_the_host(tiny_dir):
    model = loader.load_model(tiny_dir, "cpu", placer=weights.OffloadPlacer("cpu"), progress=False)
    ref = loader.load_model(tiny_dir, "cpu", progress=False)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    assert len(layers) == 14
    for name, layer in layers.items():
        other = ref.get_submodule(name)
        for part in PARTS:
            if getattr(layer, part) is not None:
                assert getattr(layer, part).device.type == "cpu" and torch.equal(getattr(layer, part), getattr(other, part))


@pytest.mark.gpu
def test_the_offload_placer_pins_the_base_and_puts_the_rest_on_the_gpu(tiny_dir):
    model = loader.load_model(tiny_dir, "cuda", placer=weights.OffloadPlacer("cuda"), progress=False)
    nf4 = [m for m in model.modules() if isinstance(m, NF4Linear)]
    assert all(m.weight.device.type == "cpu" and m.weight.is_pinned() for m in nf4)
    held = {id(getattr(m, p)) for m in nf4 for p in PARTS if getattr(m, p) is not None}
    rest = [t for t in list(model.parameters()) + list(model.buffers()) if id(t) not in held]
    assert rest and all(t.device.type == "cuda" for t in rest)


def test_runs_with_the_pipeline_and_the_offloaded_base_are_identical(tiny_smol_dir, tmp_path, finetune_cfg):
    """The recipe's own path (placer, recompute, hooks, the loop), bf16 and fp32: losses and adapter
    bytes equal to the run without the pipeline."""
    for dtype in ("bf16", "fp32"):
        runs = {}
        for name, keys in {"off": dict(weight_pipeline=False), "on": dict(weight_pipeline=True),
                           "offload": dict(offload_base=True)}.items():  # fmt: skip
            lines = []
            cfg = finetune_cfg(tiny_smol_dir, tmp_path / f"{dtype}-{name}", max_steps=3, lora_dropout=0.1, dtype=dtype,
                               gradient_checkpointing=True, **keys)  # fmt: skip
            r = finetune(cfg, out=lines.append)
            runs[name] = ([h["loss"] for h in r.history], (r.adapter_dir / peft_format.ADAPTER_WEIGHTS).read_bytes())
            said = [l for l in lines if l.startswith("weight pipeline")]
            assert said == [] if name == "off" else len(said) == 1 and said[0].startswith("weight pipeline: on"), said
            if name == "offload":
                assert "base offloaded" in said[0]
        assert runs["on"] == runs["off"] and runs["offload"] == runs["off"], dtype


def test_adapters_left_on_another_device_are_drawn_again_as_add_lora_drew_them(tiny_dir):
    from qlora_engine import lora

    model = loader.load_model(tiny_dir, "cpu", progress=False)
    lora.add_lora(model, 4, 8, seed=7)
    before = {n: (l.lora_A.detach().clone(), l.lora_B.detach().clone()) for n, l in lora.lora_layers(model).items()}
    first = next(iter(lora.lora_layers(model).values()))
    first.lora_A = torch.nn.Parameter(first.lora_A.detach().to("meta"))  # as if an offloaded base had left it elsewhere
    torch.manual_seed(123)  # the replay reseeds: what ran in between does not matter
    weights.adapters_to_device(model, CPU, seed=7)
    for name, layer in lora.lora_layers(model).items():
        assert torch.equal(layer.lora_A, before[name][0]) and torch.equal(layer.lora_B, before[name][1]), name
        assert layer.lora_A.requires_grad and layer.lora_A.device == CPU
