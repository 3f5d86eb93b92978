"""The planner's measurement of what the engine's own code allocates: the chunked loss's buffers,
from its forward run on the meta device."""

from qlora_engine.plan import livebytes


def test_loss_buffers_are_measured_from_the_loss_itself():
    """The planner runs the chunked loss's own forward on the meta device; its peak above grad_h is
    8 bytes per logit of a chunk (bf16 + fp32 logits, then fp32 logits + logsumexp's fp32 work),
    as measured on the CPU (18.09 with soft-capping, where a hand replay said 16), and it grows
    with the chunk, not with n."""
    cv = 1024 * 49152
    grad_h, peak = livebytes.loss_buffers(4096, 576, 49152, 1024, False)
    assert grad_h == 4096 * 576 * 2
    assert 8 * cv <= peak <= 8.01 * cv
    assert 18 * cv <= livebytes.loss_buffers(4096, 576, 49152, 1024, True)[1] <= 18.1 * cv
    assert livebytes.loss_buffers(8192, 576, 49152, 1024, False)[1] == peak
    assert livebytes.loss_buffers(4096, 576, 49152, 1024, True)[1] > peak  # soft-capping keeps tanh too
