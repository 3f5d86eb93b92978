"""`qlora serve` end to end: the real server in a subprocess on a free port (OMP_NUM_THREADS=1),
talked to with the official `openai` client (plain and streaming) and raw HTTP (httpx).

On a tiny random model with SmolLM2's tokenizer and chat template, and random trained-looking
adapters (add_lora, then B drawn): greedy answers equal `generate_ids` on the model
`load_with_adapter` builds, token for token, alone and in a batch of 20 over 4 adapters and the base;
streaming gives the same text; adapters load and unload while requests run (the running ones finish
exactly, the name is gone at once, the slot is reused); bad requests and bad adapters get OpenAI's
error JSON with a 4xx status and the server keeps serving; a client that disconnects mid-stream
frees its slot; SIGTERM lets running requests finish and exits 0. Then one run on the real
SmolLM2-135M-Instruct with the adapter of a real (short) training run. About 40 s on 2 CPU cores,
plus the shared `smollm2_run` fixture when it has not run yet (~45 s).
"""

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from qlora_engine.cli import main
from qlora_engine.generate import generate_ids
from qlora_engine.lora.peft_format import load_with_adapter
from qlora_engine.models.hub import load_tokenizer
from qlora_engine.models.loader import load_model

openai = pytest.importorskip("openai")

SPECS = {"a0": (8, "all-linear"), "a1": (8, "all-linear"), "a2": (16, "all-linear"), "a3": (4, ["q_proj", "v_proj"]),
         "hot": (8, "all-linear")}  # fmt: skip
PROMPTS = ["Tell me about topic number %d please" % k + " and more" * (3 * k) for k in range(4)]
N = 24
CONTEXT = 2048
QUESTION = "What is the capital of Quenlar?"


class Server:
    """`python -m qlora_engine serve ... --port 0` in a subprocess, ready to serve."""

    def __init__(self, args: list[str], log: Path, wait: bool = True):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        self.log = log
        self.out = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "qlora_engine", "serve", *args, "--port", "0"],
                                     stdout=self.out, stderr=subprocess.STDOUT, env=env)  # fmt: skip
        if wait:
            self.wait()

    def wait(self, timeout: float = 180):
        """Until the server answers /health."""
        log = self.log
        end = time.monotonic() + timeout
        self.url = None
        while self.url is None:
            assert self.proc.poll() is None, f"the server exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < end, f"the server did not start: {log.read_text()[-2000:]}"
            for line in log.read_text().splitlines():
                if line.startswith("qlora serve:") and "http://" in line:
                    self.url = line.split("http://", 1)[1].split("/", 1)[0]
            time.sleep(0.05)
        self.url = "http://" + self.url
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < end and self.proc.poll() is None, log.read_text()[-2000:]
            time.sleep(0.05)

    def client(self, cls=None):
        return (cls or openai.OpenAI)(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120)

    def stats(self) -> dict:
        return httpx.get(self.url + "/stats").json()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.out.close()


@pytest.fixture(scope="module")
def files(tiny_checkpoint, smollm2_dir, tmp_path_factory, random_adapter):
    """The tiny base (2048 positions, SmolLM2's tokenizer), adapters, bad adapters and references."""
    root = tmp_path_factory.mktemp("serve")
    base = tiny_checkpoint(root / "base", "llama", vocab_size=49152, tie_word_embeddings=True, bos_token_id=1,
                           eos_token_id=2, pad_token_id=2, intermediate_size=128, max_position_embeddings=CONTEXT,
                           tokenizer=smollm2_dir)  # fmt: skip
    adapters = {n: random_adapter(base, root / n, r, t, seed=i + 1) for i, (n, (r, t)) in enumerate(SPECS.items())}
    other = tiny_checkpoint(root / "other-base", "llama", hidden_size=128, intermediate_size=256)
    adapters["other"] = random_adapter(other, root / "other", 8, "all-linear", seed=9)
    truncated = shutil.copytree(adapters["a0"], root / "truncated")
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    badjson = shutil.copytree(adapters["a0"], root / "badjson")
    (badjson / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    tok = load_tokenizer(base)
    refs = {}
    for name in [None, "a0", "a1", "a2", "a3", "hot"]:
        model = load_model(base, progress=False).eval() if name is None else load_with_adapter(base, adapters[name])
        for p in PROMPTS:
            refs[(name, p)] = generate_ids(model, tok, p, max_new_tokens=N)[1].tolist()
        if name == "a0":
            refs["a0-long"] = generate_ids(model, tok, PROMPTS[0], max_new_tokens=300)[1].tolist()
    return {"root": root, "base": base, "adapters": adapters, "truncated": truncated, "badjson": badjson, "refs": refs,
            "tok": tok}  # fmt: skip


@pytest.fixture(scope="module")
def server(files):
    args = ["--model", str(files["base"]), "--base-name", "base", "--log-level", "warning"]
    for n in ("a0", "a1", "a2", "a3"):
        args += ["--adapter", f"{n}={files['adapters'][n]}"]
    s = Server(args, files["root"] / "server.log")
    yield s
    assert s.stop() == 0, s.log.read_text()[-2000:]
    assert "Traceback" not in s.log.read_text()


def chat_ids(client, model, prompt, **kw):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=N,
                                       temperature=0, extra_body={"return_token_ids": True}, **kw)  # fmt: skip
    return r.choices[0].model_dump()["token_ids"], r


def test_models_lists_the_base_and_every_adapter(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["base", "a0", "a1", "a2", "a3"]
    assert all(m.model_dump()["parent"] == "base" for m in models.data[1:])


def test_greedy_answers_equal_generate_alone_and_batched_over_4_adapters(server, files):
    refs = files["refs"]
    jobs = [(n, p) for n in ["a0", "a1", "a2", "a3"] for p in PROMPTS] + [(None, p) for p in PROMPTS]
    client = server.client(openai.AsyncOpenAI)

    async def one(name, prompt):
        r = await client.chat.completions.create(model=name or "base", messages=[{"role": "user", "content": prompt}],
                                                 max_tokens=N, temperature=0, extra_body={"return_token_ids": True})  # fmt: skip
        return r.choices[0].model_dump()["token_ids"], r

    async def everyone():
        return await asyncio.gather(*(one(n, p) for n, p in jobs))

    got = asyncio.run(everyone())
    for (name, prompt), (ids, r) in zip(jobs, got):
        assert ids == refs[(name, prompt)], f"{name}, prompt of {len(prompt)} chars"
        assert r.choices[0].finish_reason == ("length" if len(ids) == N else "stop")
        assert r.usage.completion_tokens == len(ids) and r.model == (name or "base")
    stats = server.stats()
    assert stats["max_batch"] >= 12 and stats["max_adapters"] >= 4, stats  # they really ran together
    assert all(any(refs[(n, p)] != refs[(None, p)] for p in PROMPTS) for n in ["a0", "a1", "a2", "a3"])
    sync = server.client()
    for name, prompt in [(None, PROMPTS[1]), ("a0", PROMPTS[3]), ("a2", PROMPTS[0]), ("a3", PROMPTS[2])]:
        assert chat_ids(sync, name or "base", prompt)[0] == refs[(name, prompt)]  # alone


def test_streaming_gives_the_same_text_and_usage(server, files):
    client = server.client()
    _, whole = chat_ids(client, "a1", PROMPTS[2])
    stream = client.chat.completions.create(model="a1", messages=[{"role": "user", "content": PROMPTS[2]}], max_tokens=N,
                                            temperature=0, stream=True, stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and len(text) > 10
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # completions, streamed and not
    done = client.completions.create(model="a2", prompt="Once upon a time", max_tokens=N, temperature=0)
    streamed = client.completions.create(model="a2", prompt="Once upon a time", max_tokens=N, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text and done.object == "text_completion"


def test_stop_seed_and_sampling_parameters(server):
    client = server.client()
    text = client.completions.create(model="a0", prompt="The list:", max_tokens=N, temperature=0).choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = client.completions.create(model="a0", prompt="The list:", max_tokens=N, temperature=0, stop=[stop, "zzzz"])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    kw = dict(model="a3", prompt="The list:", max_tokens=12, temperature=1.0, top_p=0.9)
    a, b, c = (client.completions.create(**kw, seed=s).choices[0].text for s in (5, 5, 6))
    assert a == b and a != c


def test_hot_load_and_unload_while_requests_run(server, files):
    refs, adapters, client = files["refs"], files["adapters"], server.client()
    assert len(refs["a0-long"]) == 300  # no EOS: the requests run through the load and the unload
    results = {}

    def long_a0(i):  # 300 tokens on a0, running across the load and the unload
        r = client.chat.completions.create(model="a0", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=300,
                                           temperature=0, extra_body={"return_token_ids": True})  # fmt: skip
        results[i] = r.choices[0].model_dump()["token_ids"]

    threads = [threading.Thread(target=long_a0, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    while server.stats()["running"] < 3:
        time.sleep(0.01)
    r = httpx.post(server.url + "/v1/adapters", json={"name": "hot", "path": str(adapters["hot"])})
    assert r.status_code == 200 and r.json()["id"] == "hot", r.text
    assert server.stats()["running"] == 3  # loaded while they ran
    assert [chat_ids(client, "hot", p)[0] for p in PROMPTS[:2]] == [refs[("hot", p)] for p in PROMPTS[:2]]
    r = httpx.delete(server.url + "/v1/adapters/a0")
    assert r.status_code == 200 and r.json()["running_requests"] >= 1, r.text
    with pytest.raises(openai.NotFoundError):  # the name is gone at once
        chat_ids(client, "a0", PROMPTS[0])
    assert "a0" not in [m.id for m in client.models.list().data]
    for t in threads:
        t.join(120)
    assert [results[i] for i in range(3)] == [refs["a0-long"]] * 3  # the running ones finished, exactly
    # a0's slot is free again: load it back (the freed stack entries are reused), and unload hot
    assert httpx.post(server.url + "/v1/adapters", json={"name": "a0", "path": str(adapters["a0"])}).status_code == 200
    assert httpx.delete(server.url + "/v1/adapters/hot").status_code == 200
    assert chat_ids(client, "a0", PROMPTS[1])[0] == refs[("a0", PROMPTS[1])]
    assert chat_ids(client, "a1", PROMPTS[1])[0] == refs[("a1", PROMPTS[1])]


def test_bad_requests_get_openai_errors_never_a_500(server, files):
    url, msg = server.url, [{"role": "user", "content": "hi"}]
    chat, comp = url + "/v1/chat/completions", url + "/v1/completions"
    long_prompt = "word " * (CONTEXT + 10)
    cases = [  # (method, url, json body or raw bytes, status, param, code)
        ("POST", chat, {"model": "nope", "messages": msg}, 404, "model", "model_not_found"),
        ("POST", chat, b'{"model": "a1", "messages": [', 400, None, None),
        ("POST", chat, b"[1, 2]", 400, None, None),
        ("POST", chat, {"model": "a1", "messages": [{"role": "user", "content": long_prompt}]}, 400, "messages",
         "context_length_exceeded"),
        ("POST", comp, {"model": "a1", "prompt": long_prompt}, 400, "prompt", "context_length_exceeded"),
        ("POST", comp, {"model": "a1", "prompt": "hi", "max_tokens": CONTEXT}, 400, "prompt", "context_length_exceeded"),
        ("POST", chat, {"model": "a1", "messages": msg, "temperature": -1}, 400, "temperature", None),
        ("POST", chat, {"model": "a1", "messages": msg, "top_p": 0}, 400, "top_p", None),
        ("POST", chat, {"model": "a1", "messages": msg, "max_tokens": 0}, 400, "max_tokens", None),
        ("POST", chat, {"model": "a1", "messages": msg, "max_tokens": "5"}, 400, "max_tokens", None),
        ("POST", chat, {"model": "a1", "messages": msg, "seed": 1.5}, 400, "seed", None),
        ("POST", chat, {"model": "a1", "messages": msg, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
        ("POST", chat, {"model": "a1", "messages": msg, "n": 2}, 400, "n", None),
        ("POST", chat, {"model": "a1", "messages": msg, "logprobs": True}, 400, "logprobs", None),
        ("POST", chat, {"model": "a1", "messages": []}, 400, "messages", None),
        ("POST", chat, {"model": "a1", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", None),
        ("POST", chat, {"model": "a1", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
         "messages[0].content", None),
        ("POST", chat, {"messages": msg}, 400, "model", None),
        ("POST", comp, {"model": "a1", "prompt": ["a", "b"]}, 400, "prompt", None),
        ("POST", comp, {"model": "a1", "prompt": ""}, 400, "prompt", None),
        ("POST", url + "/v1/adapters", {"name": "x", "path": str(files["root"] / "missing")}, 400, "path", None),
        ("POST", url + "/v1/adapters", {"name": "a1", "path": str(files["adapters"]["hot"])}, 409, "name", "adapter_exists"),
        ("POST", url + "/v1/adapters", {"name": "bad name!", "path": str(files["adapters"]["hot"])}, 400, "name", None),
        ("POST", url + "/v1/adapters", {"name": "x"}, 400, "path", None),
        ("DELETE", url + "/v1/adapters/nope", None, 404, "name", "adapter_not_found"),
        ("GET", url + "/v1/nothing", None, 404, None, None),
        ("GET", chat, None, 405, None, None),
    ]  # fmt: skip
    for method, where, body, status, param, code in cases:
        kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
        r = httpx.request(method, where, timeout=30, **({} if body is None else kw))
        err = r.json()["error"]
        assert (r.status_code, err["param"], err["code"]) == (status, param, code), (body, r.text)
        assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        chat_ids(server.client(), "nope", "hi")
    assert chat_ids(server.client(), "a1", PROMPTS[0])[0] == files["refs"][("a1", PROMPTS[0])]  # still serving


def test_adapters_for_another_base_or_damaged_are_refused_and_serving_goes_on(server, files):
    for name, path, words in [("other", files["adapters"]["other"], "different base"),
                              ("truncated", files["truncated"], "truncated"),
                              ("badjson", files["badjson"], "adapter_config.json")]:  # fmt: skip
        r = httpx.post(server.url + "/v1/adapters", json={"name": name, "path": str(path)})
        message = r.json()["error"]["message"]
        assert r.status_code == 400 and words in message and "\n" not in message, r.text
    assert [m.id for m in server.client().models.list().data if m.id in ("other", "truncated", "badjson")] == []
    assert chat_ids(server.client(), "a2", PROMPTS[1])[0] == files["refs"][("a2", PROMPTS[1])]


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    before = server.stats()["cancelled"]
    body = {"model": "a1", "prompt": "Go on:", "max_tokens": CONTEXT - 10, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert sum(1 for _, line in zip(range(6), lines) if line.startswith("data: ")) == 3
    end = time.monotonic() + 20
    while server.stats()["running"] or server.stats()["cancelled"] == before:
        assert time.monotonic() < end, server.stats()
        time.sleep(0.05)


def test_startup_refuses_bad_adapters_and_a_taken_port_in_one_line(server, files, capsys):
    assert main(["serve", "--model", str(files["base"]), "--adapter", "no-equals-sign"]) == 2
    assert main(["serve", "--model", str(files["base"]), "--adapter", f"x={files['adapters']['other']}", "--port", "0"]) == 2
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    assert main(["serve", "--model", str(files["base"]), "--host", host, "--port", port]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 3 and "Traceback" not in err, err
    assert "NAME=DIR" in errors[0] and "different base" in errors[1] and "cannot listen" in errors[2]


def test_sigterm_lets_running_requests_finish_and_exits_0(files, tmp_path):
    s = Server(["--model", str(files["base"]), "--adapter", f"a0={files['adapters']['a0']}", "--log-level", "info"],
               tmp_path / "server.log")  # fmt: skip
    body = {"model": "a0", "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 300, "temperature": 0,
            "stream": True}  # fmt: skip
    chunks, ended = [], threading.Event()

    def read():
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=body, timeout=60) as r:
            chunks.extend(line for line in r.iter_lines() if line)
        ended.set()

    reader = threading.Thread(target=read)
    reader.start()
    while len(chunks) < 4:
        time.sleep(0.01)
    assert s.stop() == 0  # SIGTERM
    reader.join(30)
    data = [json.loads(c[6:]) for c in chunks if c.startswith("data: {")]
    assert chunks[-1] == "data: [DONE]" and data[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(d["choices"][0]["delta"].get("content") or "" for d in data)
    assert text == files["tok"].decode(files["refs"]["a0-long"], skip_special_tokens=True)
    log = s.log.read_text()
    assert "Traceback" not in log and "qlora serve: stopped" in log
    with pytest.raises(httpx.TransportError):
        httpx.get(s.url + "/health", timeout=2)


def test_real_model_with_a_trained_adapter(smollm2_run, smollm2_dir, tmp_path):
    """SmolLM2-135M-Instruct in NF4 with the adapter of a real training run: the server's greedy
    answer is `qlora generate`'s, token for token, and differs from the base's."""
    adapter = smollm2_run[0] / "adapter"
    s = Server(["--model", str(smollm2_dir), "--base-name", "smollm2", "--adapter", f"demo={adapter}"], tmp_path / "s.log",
               wait=False)  # fmt: skip
    try:
        tok = load_tokenizer(smollm2_dir)  # the reference, while the server starts
        want = generate_ids(load_with_adapter(smollm2_dir, adapter), tok, QUESTION, max_new_tokens=16)[1].tolist()
        s.wait()
        client = s.client(openai.AsyncOpenAI)

        async def both():
            return await asyncio.gather(*(client.chat.completions.create(
                model=m, messages=[{"role": "user", "content": QUESTION}], max_tokens=16, temperature=0,
                extra_body={"return_token_ids": True}) for m in ("demo", "smollm2")))  # fmt: skip

        demo, base = asyncio.run(both())
    finally:
        assert s.stop() == 0
    answer = demo.choices[0].message.content
    print(f"\n[serve] demo adapter: {answer!r}\n[serve] base:         {base.choices[0].message.content!r}")
    assert demo.choices[0].model_dump()["token_ids"] == want and answer == tok.decode(want, skip_special_tokens=True)
    assert answer != base.choices[0].message.content
