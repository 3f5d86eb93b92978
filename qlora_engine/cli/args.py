"""Flags: one spelling shown, both accepted, the same meaning in every command.

Every multi-word flag is shown with dashes (`--seq-len`) and accepted with underscores too
(`--seq_len`): `normalize` rewrites the flag names of argv before parsing. The run keys of
`train.config` become flags here, generated from the dataclasses, so flags and config cannot drift
apart; `plan` takes the same ones as `finetune`. A parse error is one line (`Parser.error`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys

from ..train import config as config_mod


def normalize(argv: list[str]) -> list[str]:
    """`--seq_len 512` / `--seq_len=512` -> `--seq-len 512` / `--seq-len=512`; values untouched."""
    out = []
    for a in argv:
        if a.startswith("--") and len(a) > 2:
            name, eq, value = a.partition("=")
            a = name.replace("_", "-") + eq + value
        out.append(a)
    return out


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (what is wrong, the nearest flag, where the flags are listed)
    and no abbreviated flags (`--lora` must not silently mean `--lora-r`)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, allow_abbrev=False, **kw)

    def parse_args(self, args=None, namespace=None):
        ns, unknown = self.parse_known_args(args, namespace)
        if unknown:
            flag = unknown[0].split("=")[0]
            if flag.startswith("-"):
                opts = sorted({o for a in self._actions for o in a.option_strings if o.startswith("--")})
                near = difflib.get_close_matches(flag, opts, n=1)
                self.error(f"unknown flag {flag}" + (f"; did you mean {' or '.join(near)}?" if near else ""))
            self.error(f"unexpected argument {unknown[0]!r}: flags take the form --key value")
        return ns

    def error(self, message: str):
        print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def parser(prog: str, description: str, **kw) -> Parser:
    p = Parser(prog=prog, description=description, **kw)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (or set QLORA_ENGINE_DEBUG=1)")
    return p


def add_device(p: argparse.ArgumentParser, what: str = "where to compute") -> None:
    p.add_argument("--device", default="auto", help=f"{what}: cpu, cuda, cuda:N, or auto (cuda when available) [auto]")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_run_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """`--config FILE` plus one flag per run key, grouped by concern; values are parsed later
    (`run_config`) so that the config file and the flags go through the same checks."""
    p.add_argument("--config", default=argparse.SUPPRESS, help="YAML file of key: value pairs (flags override it)")
    for cls in config_mod.CONCERNS:
        group = p.add_argument_group(f"run keys: {cls.__name__.replace('Config', '').lower()}")
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            default = f.default if f.default is not dataclasses.MISSING else None
            switch = {"nargs": "?", "const": "true"} if bool in config_mod._types(f) else {}  # `--resume` alone means true
            group.add_argument(flag(f.name), dest=f.name, metavar=f.name.upper(), default=argparse.SUPPRESS,
                               help=f"{f.metadata['help']} [{default}]", **switch)  # fmt: skip


def run_config(ns: argparse.Namespace, defaults: dict | None = None) -> config_mod.RunConfig:
    """Defaults < `defaults` < the --config file < flags, validated as one RunConfig."""
    fields = set(config_mod.all_fields())
    given = {k: v for k, v in vars(ns).items() if k in fields}
    values = dict(defaults or {})
    if getattr(ns, "config", None):
        values.update(config_mod.load_yaml(ns.config))
    values.update(given)
    return config_mod.from_dict(values)
