"""The custom ops: schemas, fake kernels, and the default kernels against the format spec."""

import pytest
import torch

from qlora_engine.quant import nf4, ops


def weight_args(n, k, dq=True, blocksize=64, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    packed, s = nf4.quantize_4bit(w, blocksize, double_quant=dq)
    return (packed, s.absmax, s.code, s.nested_absmax, s.nested_code, s.offset, blocksize, n, k), s


@pytest.mark.parametrize("dq", [False, True])
def test_opcheck_all_ops(dq):
    args, s = weight_args(96, 80, dq)
    x = torch.randn(7, 80, dtype=torch.bfloat16)
    dy = torch.randn(7, 96, dtype=torch.bfloat16)
    w = torch.randn(33, 70)
    checks = [
        (ops.matmul_4bit, (x, *args)),
        (ops.matmul_4bit_t, (dy, *args)),
        (ops.dequantize_4bit, (args[0], s.absmax, s.code, s.nested_absmax, s.nested_code, s.offset, 64, [96, 80], torch.bfloat16)),
        (ops.quantize_4bit, (w, nf4.code_table("nf4"), 64)),
        (ops.quantize_8bit, (w, nf4.dynamic_map(), 256)),
    ]
    for op, a in checks:
        result = torch.library.opcheck(op, a)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


def test_matmuls_equal_dequantize_then_matmul():
    args, s = weight_args(130, 68, blocksize=32)  # blocks straddle rows
    w = nf4.dequantize_4bit(args[0], s, torch.bfloat16)
    x = torch.randn(3, 5, 68, dtype=torch.bfloat16)
    assert torch.equal(ops.matmul_4bit(x, *args), x @ w.t())
    dy = torch.randn(11, 130, dtype=torch.bfloat16)
    assert torch.equal(ops.matmul_4bit_t(dy, *args), dy @ w)


def test_quantize_op_equals_format():
    w = torch.randn(77, 33, dtype=torch.float16)
    packed, absmax = ops.quantize_4bit(w, nf4.code_table("nf4"), 64)
    p2, s2 = nf4.quantize_4bit(w, 64, double_quant=False)
    assert torch.equal(packed, p2.view(-1)) and torch.equal(absmax, s2.absmax)


def test_import_does_not_initialise_cuda():
    import subprocess
    import sys

    code = "import torch, qlora_engine.quant.ops, qlora_engine.models.loader, qlora_engine.lora; print(torch.cuda.is_initialized())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
