"""The scheduler in-process, on a tiny random model with SmolLM2's tokenizer and four random
adapters (ranks 8, 8, 16 and 4, one on q/v only): greedy answers equal `generate_ids` on the model
`load_with_adapter` builds, token for token, for prompts of different lengths on different adapters
and on the base, prefilled together, joining while others decode; a seeded sampled answer does not
depend on its batch; a cancelled request frees its slot and adapter. CPU, about 5 s."""

import threading
import time

import pytest

from qlora_engine.generate import generate_ids, prompt_ids
from qlora_engine.lora.peft_format import load_with_adapter
from qlora_engine.models.hub import load_tokenizer
from qlora_engine.models.loader import BASE_DTYPE, QuantSpec, load_model
from qlora_engine.serve.adapters import AdapterRegistry
from qlora_engine.serve.engine import Engine, Sequence
from qlora_engine.serve.sampling import SamplingParams

SPECS = [(8, "all-linear"), (8, "all-linear"), (16, "all-linear"), (4, ["q_proj", "v_proj"])]
PROMPTS = ["Tell me about topic number %d please" % k + " and more" * (3 * k) for k in range(4)]
N = 20


@pytest.fixture(scope="module")
def setup(tiny_smol_dir, tmp_path_factory, random_adapter):
    root = tmp_path_factory.mktemp("engine")
    dirs = [random_adapter(tiny_smol_dir, root / f"a{i}", r, t, seed=i + 1) for i, (r, t) in enumerate(SPECS)]
    tok = load_tokenizer(tiny_smol_dir)
    refs = {}
    for i in [None, 0, 1, 2, 3]:
        m = load_model(tiny_smol_dir, progress=False).eval() if i is None else load_with_adapter(tiny_smol_dir, dirs[i])
        for p in PROMPTS:
            refs[(i, p)] = generate_ids(m, tok, p, max_new_tokens=N)[1].tolist()
    model = load_model(tiny_smol_dir, progress=False).eval()
    registry = AdapterRegistry(model, "base", "nf4", QuantSpec(), BASE_DTYPE)
    for i, d in enumerate(dirs):
        registry.install(registry.prepare(f"a{i}", d))
    engine = Engine(model, tok, registry, max_batch=64)
    engine.start()
    yield engine, registry, tok, refs
    engine.stop()


def wait_for(condition, timeout=30.0):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.002)


class Collector:
    def __init__(self):
        self.done, self.events = threading.Event(), []

    def __call__(self, event):
        self.events.append(event)
        if event[0] in ("done", "error"):
            self.done.set()

    def result(self, timeout=60):
        assert self.done.wait(timeout), "no answer in time"
        return self.events[-1]


def submit(engine, registry, tok, adapter, prompt, **params):
    c = Collector()
    seq = Sequence(prompt_ids(tok, prompt)[0].tolist(), SamplingParams(**{"max_tokens": N, "temperature": 0.0, **params}),
                   None if adapter is None else registry.acquire(adapter), c, tok)  # fmt: skip
    engine.submit(seq)
    return seq, c


def test_greedy_answers_equal_generate_alone_batched_and_joining_mid_decode(setup):
    engine, registry, tok, refs = setup
    jobs = [(i, p) for i in [None, 0, 1, 2, 3] for p in PROMPTS]
    # first wave: 12 requests; the second wave joins once the first is decoding
    first = {j: submit(engine, registry, tok, None if j[0] is None else f"a{j[0]}", j[1])[1] for j in jobs[:12]}
    wait_for(lambda: any(e[0] == "text" for c in first.values() for e in c.events))
    second = {j: submit(engine, registry, tok, None if j[0] is None else f"a{j[0]}", j[1])[1] for j in jobs[12:]}
    got = {j: c.result() for j, c in {**first, **second}.items()}
    for j in jobs:
        kind, info = got[j]
        assert kind == "done" and info["token_ids"] == refs[j], f"adapter {j[0]}, prompt {len(j[1])} chars"
    stats = engine.snapshot()
    assert stats["prefill_batches"] >= 2 and stats["max_batch"] >= 12 and stats["max_adapters"] == 4
    # the adapters matter: each changes the answer to some prompt
    for i in range(4):
        assert any(refs[(i, p)] != refs[(None, p)] for p in PROMPTS)
    # alone: one at a time
    for j in [(None, PROMPTS[3]), (2, PROMPTS[1]), (3, PROMPTS[0])]:
        _, c = submit(engine, registry, tok, None if j[0] is None else f"a{j[0]}", j[1])
        assert c.result()[1]["token_ids"] == refs[j]


def test_a_seeded_sample_does_not_depend_on_its_batch(setup):
    engine, registry, tok, _ = setup
    params = dict(temperature=0.9, top_p=0.95, seed=1234, max_tokens=16)
    _, alone = submit(engine, registry, tok, "a1", PROMPTS[2], **params)
    alone = alone.result()[1]["token_ids"]
    others = [submit(engine, registry, tok, f"a{i % 4}", PROMPTS[i % 4], temperature=1.0, seed=i)[1] for i in range(6)]
    _, batched = submit(engine, registry, tok, "a1", PROMPTS[2], **params)
    assert batched.result()[1]["token_ids"] == alone
    for c in others:
        c.result()
    _, other_seed = submit(engine, registry, tok, "a1", PROMPTS[2], **{**params, "seed": 99})
    assert other_seed.result()[1]["token_ids"] != alone


def test_a_cancelled_request_frees_its_slot_and_adapter(setup):
    engine, registry, tok, _ = setup
    seq, c = submit(engine, registry, tok, "a2", PROMPTS[0], max_tokens=200, ignore_eos=True)
    wait_for(lambda: any(e[0] == "text" for e in c.events))
    seq.cancel()
    kind, (status, _) = c.result()
    assert (kind, status) == ("error", 499)
    assert len([e for e in c.events if e[0] == "text"]) < 150
    a2 = registry.acquire("a2")
    assert a2.users == 1  # only this acquire: the cancelled request gave its use back
    registry.release(a2)
    assert engine.snapshot()["running"] == 0
