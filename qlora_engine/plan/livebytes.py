"""What the engine's own code would allocate, learned without allocating: `LiveBytes`, a dispatch
mode that counts live tensor storages (on the meta device, where nothing is allocated), and
`loss_buffers`, the chunked loss's buffers measured by running `train.loss`'s forward under it.
The memory model (`memory`) takes the loss's terms from here, so the two cannot drift apart.
Reads `train.loss`; touches nothing else.
"""

from __future__ import annotations

BF16 = 2


def loss_buffers(n: int, hidden: int, vocab: int, chunk: int, softcap: bool, act: int = BF16) -> tuple[int, int]:
    """(grad_h bytes, peak bytes of the chunk loop above grad_h) of `train.loss.ChunkedCrossEntropy`
    for n target rows: measured by running that forward itself on the meta device (no memory, no
    arithmetic) under `LiveBytes`. Every chunk starts from the same state, so two chunks (a full
    one and the last, partial one) show the peak of any n."""
    import torch

    from ..train.loss import ChunkedCrossEntropy

    key = (n, hidden, vocab, chunk, bool(softcap), act)
    if key not in _LOSS_CACHE:
        dtype = {2: torch.bfloat16, 4: torch.float32}[act]
        rows = min(n, chunk) + (n % chunk if n > chunk else 0)
        h = torch.empty(rows, hidden, dtype=dtype, device="meta", requires_grad=True)
        w = torch.empty(vocab, hidden, dtype=dtype, device="meta")
        y = torch.zeros(rows, dtype=torch.long, device="meta")
        grad_h = rows * hidden * act
        with LiveBytes() as live:
            ChunkedCrossEntropy.forward(_Ctx(), h, w, None, y, float(n), chunk, float(softcap) if softcap else 0.0)
        _LOSS_CACHE[key] = (n * hidden * act, live.peak - grad_h)
    return _LOSS_CACHE[key]


_LOSS_CACHE: dict[tuple, tuple[int, int]] = {}


class _Ctx:
    """Stands in for autograd's ctx when a Function's forward is run on its own."""

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def _logsumexp_work(args) -> int:
    x = args[0]
    return x.numel() * 4  # ATen: sum((x - max).exp_()) holds one float32 copy of x


class LiveBytes:
    """A dispatch mode that counts the bytes of every tensor storage created inside it while that
    storage is alive (views and in-place results share their storage's bytes), and the peak.
    Works on the meta device, where nothing is allocated: the planner runs the engine's own code
    under it to learn what that code would allocate. Storages that existed before (the inputs) are
    not counted. A kernel's internal temporaries are invisible at this level; for the ops the
    engine's code uses that have them, `INTERNAL` gives their size, counted for the op's duration."""

    INTERNAL = {"aten.logsumexp.default": _logsumexp_work}

    def __enter__(self):
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        live, counts, external = {}, {}, set()
        self.cur = self.peak = 0
        tracker = self

        def release(key):
            counts[key] -= 1
            if counts[key] == 0:
                tracker.cur -= live.pop(key)
                del counts[key]

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                for t in tree_leaves((args, kwargs)):
                    if hasattr(t, "untyped_storage") and t.untyped_storage()._cdata not in live:
                        external.add(t.untyped_storage()._cdata)
                work = LiveBytes.INTERNAL.get(str(func))
                if work:
                    tracker.peak = max(tracker.peak, tracker.cur + work(args))
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if hasattr(t, "untyped_storage"):
                        key = t.untyped_storage()._cdata
                        if key in external:
                            continue
                        if key not in live:
                            live[key], counts[key] = t.untyped_storage().nbytes(), 0
                            tracker.cur += live[key]
                            tracker.peak = max(tracker.peak, tracker.cur)
                        counts[key] += 1
                        weakref.finalize(t, release, key)
                return out

        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
