"""The continuous-batching scheduler: one thread owns the model and runs it step by step.

Each turn of the loop: run the commands queued for the model (install or remove an adapter), drop
cancelled requests, admit waiting requests (their prompts prefilled together as one left-padded
batch, up to a budget of prompt tokens a turn so that running requests keep moving), then one
decode step for every running request at once, whatever adapters they use (`MultiLoraLinear`) and
however long they are (`kv_cache`: a cache per sequence, attention per row). A request leaves the
batch when it ends (EOS, a stop string, max_tokens) or is cancelled, and its cache goes with it.
Greedy answers equal `generate_ids`' token for token, alone or in any batch.

Results go back through each `Sequence`'s `emit` callback, called on the engine thread: ("text",
str), ("done", info dict) or ("error", (http status, message)). Touches the model it is given and
the adapter registry; nothing else.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import os
import threading
from typing import Callable

import torch
from torch import nn

from ..errors import RunError
from ..generate import eos_ids
from .adapters import Adapter, AdapterRegistry
from .detokenize import TextStream
from .kv_cache import RowCaches, cache_argument, new_cache, prepare_model
from .sampling import SamplingParams, next_tokens

log = logging.getLogger("qlora_engine.serve")
_ids = itertools.count(1)


class Sequence:
    """One request inside the engine: its prompt, adapter, parameters, tokens so far and cache."""

    def __init__(self, prompt: list[int], params: SamplingParams, adapter: Adapter | None, emit: Callable, tokenizer):
        self.id = next(_ids)
        self.prompt, self.params, self.adapter, self.emit = prompt, params, adapter, emit
        self.tokens: list[int] = []
        self.cache = None
        self.cancelled = False
        self.stream = TextStream(tokenizer, params.stop)
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def slot(self) -> int:
        return 0 if self.adapter is None else self.adapter.slot

    def cancel(self) -> None:
        """Stop it at the next step (any thread): a client went away."""
        self.cancelled = True


class Engine:
    """The scheduler thread (module docstring). `submit` and `call` may be used from any thread."""

    def __init__(self, model: nn.Module, tokenizer, registry: AdapterRegistry, max_batch: int = 32,
                 prefill_tokens: int = 2048):  # fmt: skip
        self.model, self.tokenizer, self.registry = model, tokenizer, registry
        self.max_batch, self.prefill_tokens = max_batch, prefill_tokens
        self.device = next(model.parameters()).device
        self.eos = set(eos_ids(model, tokenizer))
        self.cache_arg = cache_argument(model)
        prepare_model(model, registry.rows)
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._running: list[Sequence] = []
        self._commands: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._running_loop, self._done = threading.Event(), threading.Event()
        self.stats = {"steps": 0, "prefills": 0, "prefill_batches": 0, "tokens": 0, "max_batch": 0, "max_adapters": 0,
                      "cancelled": 0}  # fmt: skip

    # --- any thread -------------------------------------------------------------------------
    def start(self) -> None:
        """Run the loop on a thread of its own."""
        self._thread = threading.Thread(target=self._loop, name="qlora-serve-engine", daemon=True)
        self._thread.start()

    def run(self) -> None:
        """Run the loop on the calling thread until `stop` (`qlora serve` runs it on Python's main
        thread: on the CPU, torch's OpenMP parallel regions run 1.6x faster there than on any other
        thread)."""
        self._loop()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the current step, end every request left with an error, and wait for the loop to end."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        elif self._running_loop.is_set():
            self._done.wait(timeout)

    def submit(self, seq: Sequence) -> None:
        with self._lock:
            if self._stopping:
                raise RunError("the server is shutting down")
            self._waiting.append(seq)
        self._wake.set()

    def call(self, fn: Callable, *args) -> concurrent.futures.Future:
        """Run fn(*args) on the engine thread between two steps; its result or exception comes in the future."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._stopping:
                raise RunError("the server is shutting down")
            self._commands.append((fn, args, fut))
        self._wake.set()
        return fut

    def snapshot(self) -> dict:
        with self._lock:
            return {**self.stats, "running": len(self._running), "waiting": len(self._waiting)}

    # --- the engine thread ------------------------------------------------------------------
    def _loop(self) -> None:
        self._running_loop.set()
        try:
            with torch.no_grad():
                self._warm_up()
                while not self._stopping:
                    self._run_commands()
                    self._drop_cancelled()
                    admitted = self._admit()
                    if self._running:
                        self._step(self._decode, list(self._running))
                    elif not admitted:
                        self._wake.wait(0.5)
                        self._wake.clear()
        finally:
            with self._lock:
                left = list(self._running) + list(self._waiting)
                commands = list(self._commands)
                self._running, self._waiting, self._commands = [], collections.deque(), collections.deque()
            for seq in left:
                self._end(seq, error=(503, "the server is shutting down"))
            for _, _, fut in commands:
                fut.set_exception(RunError("the server is shutting down"))
            self._done.set()

    def _warm_up(self) -> None:
        """One tiny prefill and decode step before the first request, which would otherwise pay for
        the kernels' first-call setup (seconds on some CPUs)."""
        seq = Sequence([self.tokenizer.eos_token_id or 0] * 2, SamplingParams(max_tokens=2, temperature=0.0), None,
                       lambda event: None, self.tokenizer)  # fmt: skip
        self._step(self._prefill, [seq])
        if seq in self._running:
            self._step(self._decode, [seq])
        self._running.clear()
        self.stats.update(steps=0, prefills=0, prefill_batches=0, tokens=0, max_batch=0, max_adapters=0)

    def _run_commands(self) -> None:
        while True:
            with self._lock:
                if not self._commands:
                    return
                fn, args, fut = self._commands.popleft()
            try:
                fut.set_result(fn(*args))
            except Exception as e:  # noqa: BLE001 - handed to the caller, which reports it
                fut.set_exception(e)

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self._running if s.cancelled]:
            self._running.remove(seq)
            self.stats["cancelled"] += 1
            self._end(seq)

    def _admit(self) -> bool:
        """Prefill the waiting requests that fit (batch size, prompt-token budget) as one batch."""
        group: list[Sequence] = []
        longest = 0
        while len(self._running) + len(group) < self.max_batch:
            with self._lock:
                if not self._waiting:
                    break
                seq = self._waiting[0]
                if group and (len(group) + 1) * max(longest, len(seq.prompt)) > self.prefill_tokens:
                    break
                self._waiting.popleft()
            if seq.cancelled:
                self.stats["cancelled"] += 1
                self._end(seq)
                continue
            group.append(seq)
            longest = max(longest, len(seq.prompt))
        if group:
            self._step(self._prefill, group)
        return bool(group)

    def _step(self, fn: Callable, seqs: list[Sequence]) -> None:
        """fn(seqs); a failure ends those requests with an error and the server goes on."""
        try:
            fn(seqs)
        except Exception as e:  # noqa: BLE001 - one failed step must not stop the server
            log.exception("a model step failed")
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else type(e).__name__
            for seq in seqs:
                if seq in self._running:
                    self._running.remove(seq)
                self._end(seq, error=(500, f"the model step failed ({why})"))

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, cache, seqs: list[Sequence],
                 starts: list[int] | None = None) -> torch.Tensor:  # fmt: skip
        self.registry.rows.set([s.slot for s in seqs], starts)
        # the last column as an index, not a slice: a contiguous [B, 1, hidden] goes through lm_head
        # as one 2-D matmul (a strided slice of a [B, T, hidden] would take a batched matmul over B
        # copies of the weight)
        last = torch.tensor([ids.shape[1] - 1], device=self.device)
        out = self.model(input_ids=ids.to(self.device), position_ids=positions.to(self.device), use_cache=True,
                         logits_to_keep=last, **{self.cache_arg: cache})  # fmt: skip
        return out.logits[:, -1, :].float()

    def _prefill(self, seqs: list[Sequence]) -> None:
        """The prompts, left-padded to the longest so that every row's last token is the last column."""
        longest = max(len(s.prompt) for s in seqs)
        ids = torch.zeros(len(seqs), longest, dtype=torch.long)
        positions = torch.zeros(len(seqs), longest, dtype=torch.long)
        starts = []
        for b, seq in enumerate(seqs):
            n = len(seq.prompt)
            ids[b, longest - n :] = torch.tensor(seq.prompt)
            positions[b, longest - n :] = torch.arange(n)
            starts.append(longest - n)
            seq.cache = new_cache(self.model)
        logits = self._forward(ids, positions, RowCaches([s.cache for s in seqs], starts), seqs, starts)
        self.stats["prefills"] += len(seqs)
        self.stats["prefill_batches"] += 1
        self._advance(seqs, logits)

    def _decode(self, seqs: list[Sequence]) -> None:
        ids = torch.tensor([[s.tokens[-1]] for s in seqs])
        positions = torch.tensor([[len(s.prompt) + len(s.tokens) - 1] for s in seqs])
        logits = self._forward(ids, positions, RowCaches([s.cache for s in seqs]), seqs)
        self.stats["steps"] += 1
        self.stats["max_batch"] = max(self.stats["max_batch"], len(seqs))
        self.stats["max_adapters"] = max(self.stats["max_adapters"], len({s.slot for s in seqs if s.slot}))
        self._advance(seqs, logits)

    def _advance(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        tokens = next_tokens(logits, [s.params for s in seqs], [s.generator for s in seqs])
        self.stats["tokens"] += len(tokens)
        for seq, t in zip(seqs, tokens):
            seq.tokens.append(t)
            reason = None
            if t in self.eos and not seq.params.ignore_eos:
                reason = "stop"
            else:
                text = seq.stream.add(t)
                if text:
                    seq.emit(("text", text))
                if seq.stream.stopped:
                    reason = "stop"
                elif len(seq.tokens) >= seq.params.max_tokens:
                    reason = "length"
            if reason is None:
                if seq not in self._running:
                    self._running.append(seq)
                continue
            if seq in self._running:
                self._running.remove(seq)
            self._end(seq, reason=reason)

    def _end(self, seq: Sequence, reason: str | None = None, error: tuple[int, str] | None = None) -> None:
        """Free a request's cache and adapter, and tell its client how it ended."""
        seq.cache = None
        self.registry.release(seq.adapter)
        if error is not None:
            seq.emit(("error", error))
        elif reason is not None:
            tail = seq.stream.finish()
            if tail:
                seq.emit(("text", tail))
            seq.emit(("done", {"finish_reason": reason, "prompt_tokens": len(seq.prompt),
                               "completion_tokens": len(seq.tokens), "token_ids": list(seq.tokens)}))  # fmt: skip
        else:
            seq.emit(("error", (499, "the request was cancelled")))
