"""The README's Python API example runs as written (on the real small model), and does what it says."""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- api-example: tests/test_api.py runs this block -->"


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    assert MARK in text, "the README's API example lost its marker"
    m = re.search(r"```python\n(.*?)```", text.split(MARK, 1)[1], re.S)
    return m.group(1)


def test_readme_api_example_runs(smollm2_dir, tmp_path):
    code = readme_example()
    out = io.StringIO()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md (API example)", "exec"), {"__name__": "readme_example"})
    finally:
        os.chdir(cwd)
    printed = out.getvalue()
    before, after = map(float, re.search(r"eval loss ([\d.]+) -> ([\d.]+)", printed).groups())
    assert after < before - 0.5, printed
    assert "Ostrevane" in printed  # the fact it was taught, from the adapted model
    assert "fits:" in printed  # the plan
    assert (tmp_path / "runs" / "api" / "merged" / "model.safetensors").exists()
    assert (tmp_path / "runs" / "api" / "adapter" / "adapter_config.json").exists()
