"""The knobs: one dataclass per concern, each field with a one-line help text.

Training, the memory planner and the CLI read the same `RunConfig`, so one YAML file serves all.
Keys are flat (`lora_r: 16`, not `lora: {r: 16}`); every key is also a command-line flag
(`--lora-r 16` or `--lora_r 16`), generated from these fields by `cli.args`, so flags and config
cannot drift apart. Touches yaml only.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import InputError


def knob(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    model: str = knob("SmolLM2-135M-Instruct", "checkpoint directory, hub id (org/name[@revision]), or SmolLM2-135M-Instruct "
                      "for the bundled default")
    allow_pickle: bool = knob(False, "also read pickled .bin/.pt weights (weights_only) when a model has no safetensors")
    base: str = knob("nf4", "base weights: nf4 (QLoRA) or bf16 (plain LoRA, for comparison)", choices=("nf4", "bf16"))
    blocksize: int = knob(64, "NF4 block size (32..4096)")
    quant_type: str = knob("nf4", "4-bit data type", choices=("nf4", "fp4"))
    double_quant: bool = knob(True, "quantize the block scales too (4.127 instead of 4.5 bits/param)")
    device: str = knob("auto", "cuda, cpu, or auto (cuda when available)")
    dtype: str = knob("bf16", "dtype the base is built in and computes in (fp32: exact comparisons, twice the memory)",
                      choices=("bf16", "fp32"))


@dataclass
class LoraConfig:
    lora_r: int = knob(16, "LoRA rank")
    lora_alpha: float = knob(32.0, "LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA)")
    lora_dropout: float = knob(0.05, "dropout on the LoRA input")
    use_rslora: bool = knob(False, "rank-stabilised scaling alpha/sqrt(r)")
    target_modules: list = knob("all-linear", "all-linear, or module names/patterns, e.g. [q_proj, v_proj] or 'mlp.*'")
    lora_dtype: str = knob("bf16", "adapter weight dtype", choices=("bf16", "fp32"))


@dataclass
class DataConfig:
    data: str = knob("demo", "training data: .jsonl/.json/.csv/.parquet file, a datasets.save_to_disk dir, a hub "
                     "dataset id (org/name[@revision]), or demo")
    data_split: str = knob("train", "split of a hub dataset or of a saved DatasetDict")
    data_subset: str | None = knob(None, "subset (configuration) of a hub dataset")
    eval_data: str | None = knob(None, "held-out data (file, directory or hub id); default: none, or eval_fraction of data")
    eval_split: str | None = knob(None, "split of eval_data (default: validation, else test, else train)")
    eval_fraction: float = knob(0.0, "fraction of data held out for eval (not trained on) when eval_data is not given; "
                                "0: hold out nothing")
    eval_max_samples: int = knob(1000, "evaluate on at most this many samples (0 = all)")
    eval_max_tokens: int | str = knob("auto", "evaluate on at most this many tokens (0 = all), bounding what each eval "
                                      "costs; auto: 8192 on a CPU (about 15 s for SmolLM2-135M), 262144 on a GPU")
    data_format: str = knob("auto", "sample format", choices=("auto", "alpaca", "chat", "prompt_completion", "text", "tokens"))
    seq_len: int | str = knob(512, "tokens per row, or auto (the longest that fits the GPU)")
    packing: bool = knob(True, "pack several samples per row (no attention or positions shared between them)")
    train_on_prompt: bool = knob(False, "also compute the loss on prompt tokens")
    max_samples: int | None = knob(None, "use at most this many training samples")
    on_bad_sample: str = knob("error", "a malformed line or sample: error (stop, naming its line) or skip (count it)",
                              choices=("error", "skip"))
    data_cache_dir: str | None = knob(None, "where prepared data is kept (default: HF_DATASETS_CACHE/qlora_engine)")
    rebuild_data: bool = knob(False, "prepare the data again even when the cache has it")
    data_num_proc: int = knob(0, "processes that prepare the data (0 = one per core)")
    streaming: bool = knob(False, "read data as a stream (larger than RAM or disk): packed on the fly, needs max_steps")
    stream_buffer: int = knob(10000, "streaming: samples packed together (bounds memory)")


@dataclass
class TrainConfig:
    output_dir: str = knob("runs/demo", "where adapters, checkpoints and metrics go")
    max_steps: int = knob(0, "optimizer steps; 0 = run `epochs` epochs")
    epochs: float = knob(1.0, "passes over the training data when max_steps is 0")
    batch_size: int | str = knob(1, "rows per micro-batch, or auto (the largest that fits the GPU)")
    grad_accum: int = knob(1, "micro-batches per optimizer step")
    lr: float = knob(2e-4, "peak learning rate")
    warmup: float = knob(0.03, "warmup: a fraction of the steps if < 1, else a step count")
    schedule: str = knob("cosine", "learning-rate schedule after warmup", choices=("cosine", "linear", "constant"))
    weight_decay: float = knob(0.0, "AdamW weight decay")
    max_grad_norm: float = knob(0.3, "gradient clipping norm (0 = off)")
    optim: str = knob("auto", "optimizer", choices=("auto", "paged_adamw_8bit", "paged_adamw_32bit", "adamw"))
    gradient_checkpointing: bool | str = knob("auto", "recompute each decoder layer in backward (auto: on for CUDA)")
    offload_activations: bool = knob(False, "with checkpointing, keep the saved layer inputs in pinned host memory")
    weight_pipeline: bool | str = knob("auto", "dequantize each decoder block's NF4 weights once into a reused 16-bit "
                                       "double buffer, one block ahead (CUDA: on a side stream, behind the compute); "
                                       "auto: on CUDA when the memory plan has room for it")
    offload_base: bool | str = knob("auto", "keep the NF4 base in pinned host memory and copy each block to the GPU one "
                                    "block ahead, through the weight pipeline (a 70B on one 24 GB GPU, PCIe-bound); "
                                    "auto: when the weights do not fit the GPU")
    loss_chunk: int = knob(1024, "tokens per chunk of the cross-entropy (bounds the fp32 logits buffer)")
    eval_every: int = knob(0, "evaluate every N optimizer steps (0 = only at the start and end)")
    eval_batch_size: int = knob(0, "rows per eval batch (0 = batch_size)")
    save_every: int = knob(0, "save a resumable checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = knob(2, "how many step checkpoints to keep")
    log_every: int = knob(1, "write metrics every N steps")
    resume: bool = knob(False, "continue from the latest checkpoint in output_dir")
    seed: int = knob(42, "seed for initialisation, data order and dropout")
    dry_run: bool = knob(False, "print two rendered samples with their masked tokens marked, then exit")
    sample_prompt: str | None = knob(None, "a question answered before and after training")
    sample_max_new_tokens: int = knob(64, "tokens generated for the sample answer")
    export: bool = knob(False, "after training, export the merged 16-bit model to output_dir/merged")
    strategy: str = knob("auto", "with several processes (torchrun / accelerate launch): ddp (each holds the base) or "
                         "fsdp (the base sharded); auto: ddp when the plan fits one device, else fsdp",
                         choices=("auto", "ddp", "fsdp"))
    dist_timeout: int = knob(600, "seconds a process waits in a collective before giving up on the others")


CONCERNS = (ModelConfig, LoraConfig, DataConfig, TrainConfig)


@dataclass
class RunConfig:
    """Everything one run needs; attribute access is flat (`cfg.lora_r`)."""

    model_args: ModelConfig = field(default_factory=ModelConfig)
    lora_args: LoraConfig = field(default_factory=LoraConfig)
    data_args: DataConfig = field(default_factory=DataConfig)
    train_args: TrainConfig = field(default_factory=TrainConfig)

    def __getattr__(self, name):
        for part in ("model_args", "lora_args", "data_args", "train_args"):
            sub = self.__dict__.get(part)
            if sub is not None and name in sub.__dataclass_fields__:
                return getattr(sub, name)
        raise AttributeError(name)

    def flat(self) -> dict:
        parts = (self.model_args, self.lora_args, self.data_args, self.train_args)
        return {k: v for part in parts for k, v in dataclasses.asdict(part).items()}

    def replace(self, **changes) -> "RunConfig":
        return from_dict({**self.flat(), **changes})

    @classmethod
    def make(cls, **values) -> "RunConfig":
        """`RunConfig.make(model="org/name", lora_r=8)`: the defaults with these keys changed, validated."""
        return from_dict(values)


def all_fields() -> dict[str, tuple[type, dataclasses.Field]]:
    """Flat key -> (owning dataclass, field)."""
    return {f.name: (cls, f) for cls in CONCERNS for f in dataclasses.fields(cls)}


class ConfigError(InputError):
    """A bad key or value: the message names it and says what would be accepted."""


def _types(f: dataclasses.Field) -> tuple:
    hint = typing.get_type_hints(_owner(f.name))[f.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return tuple(typing.get_args(hint))
    return (hint,)


def _owner(name: str) -> type:
    return all_fields()[name][0]


_TRUE, _FALSE = {"true", "yes", "1", "on"}, {"false", "no", "0", "off"}


def coerce(name: str, value):
    """Convert a YAML/CLI value to the field's type, or raise ConfigError naming the key."""
    _, f = all_fields()[name]
    allowed = _types(f)
    choices = f.metadata.get("choices")
    if isinstance(value, str) and f.name == "target_modules":
        value = value.strip()
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
        if type(None) in allowed:
            return None
        raise ConfigError(f"{name} needs a value ({f.metadata['help']})")
    if list in allowed:
        if isinstance(value, str):
            if value == "all-linear":
                return value
            value = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError(f"{name} must be all-linear or a list of module names, got {value!r}")
        return [str(v) for v in value]
    if bool in allowed:
        if isinstance(value, bool):
            return value
        if str(value).lower() in _TRUE:
            return True
        if str(value).lower() in _FALSE:
            return False
        if str in allowed and str(value) == "auto":
            return "auto"
        raise ConfigError(f"{name} must be true or false (or auto where allowed), got {value!r}")
    if int in allowed and not isinstance(value, bool):
        if isinstance(value, int):
            return value
        if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
            return int(value)
        if isinstance(value, float) and value.is_integer() and float not in allowed:
            return int(value)
    if float in allowed and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    if str in allowed and isinstance(value, (str, int, float)):
        value = str(value)
        if choices and value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
        if int in allowed and value != "auto":
            raise ConfigError(f"{name} must be a whole number or auto, got {value!r}")
        return value
    names = "/".join(t.__name__ for t in allowed if t is not type(None))
    raise ConfigError(f"{name} must be {names}, got {value!r}")


def _check_key(key: str) -> None:
    if key not in all_fields():
        near = difflib.get_close_matches(key, list(all_fields()), n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else "; see --help for the keys"
        raise ConfigError(f"unknown config key {key!r}{hint}")


def from_dict(values: dict) -> RunConfig:
    """A validated RunConfig from flat key: value pairs (YAML, flags or keyword arguments); keys may
    be spelt with dashes (`seq-len`) or underscores (`seq_len`)."""
    parts: dict[type, dict] = {cls: {} for cls in CONCERNS}
    for key, value in values.items():
        key = key.replace("-", "_")
        _check_key(key)
        parts[_owner(key)][key] = coerce(key, value)
    cfg = RunConfig(*(cls(**parts[cls]) for cls in CONCERNS))
    validate(cfg)
    return cfg


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold key: value pairs at the top level")
    return data


def validate(cfg: RunConfig) -> None:
    """Settings that are wrong whatever the model: one-line errors."""
    checks = [
        (isinstance(cfg.lora_r, int) and cfg.lora_r > 0, f"lora_r must be a positive whole number, got {cfg.lora_r}"),
        (0 <= cfg.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {cfg.lora_dropout}"),
        (cfg.seq_len == "auto" or cfg.seq_len >= 8, f"seq_len must be at least 8 (or auto), got {cfg.seq_len}"),
        (cfg.batch_size == "auto" or cfg.batch_size >= 1, f"batch_size must be at least 1 (or auto), got {cfg.batch_size}"),
        (cfg.grad_accum >= 1, f"grad_accum must be at least 1, got {cfg.grad_accum}"),
        (cfg.lr > 0, f"lr must be positive, got {cfg.lr}"),
        (cfg.max_steps >= 0 and cfg.epochs > 0, "max_steps must be >= 0 and epochs > 0"),
        (0 <= cfg.eval_fraction < 1, f"eval_fraction must be in [0, 1), got {cfg.eval_fraction}"),
        (cfg.eval_max_samples >= 0 and (cfg.eval_max_tokens == "auto" or cfg.eval_max_tokens >= 0),
         "eval_max_samples and eval_max_tokens must be >= 0 (eval_max_tokens may be auto)"),
        (cfg.stream_buffer >= 1 and cfg.data_num_proc >= 0, "stream_buffer must be >= 1 and data_num_proc >= 0"),
        (cfg.warmup >= 0, f"warmup must be >= 0, got {cfg.warmup}"),
        (cfg.keep_checkpoints >= 1, f"keep_checkpoints must be at least 1, got {cfg.keep_checkpoints}"),
        (cfg.loss_chunk >= 16, f"loss_chunk must be at least 16 tokens, got {cfg.loss_chunk}"),
        (not (cfg.offload_base is True and cfg.weight_pipeline is False), "offload_base true copies the base through "
         "the weight pipeline: set weight_pipeline true or auto (or offload_base false)"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
