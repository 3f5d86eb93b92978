"""Serving throughput and latency: `qlora serve` at 1, 4 and 16 concurrent clients spread over 1, 4
and 16 adapters, against the same requests run one at a time, and the memory each loaded adapter
costs.

    python scripts/bench_serve.py                                   # CPU: SmolLM2-135M-Instruct, NF4 base
    python scripts/bench_serve.py --write benchmarks/serve-cpu.md
    python scripts/bench_serve.py --device cuda --model DIR --requests 64 --max-tokens 128

The adapters are random and trained-looking (rank --rank on every linear layer, B drawn, as after
training), saved in PEFT's format. The server runs in its own process (`python -m qlora_engine
serve`); the clients are asyncio tasks here, each sending its next request when the last one ends,
streaming (time to first token) with greedy decoding and `ignore_eos`, so every request answers
exactly --max-tokens tokens. Request i uses adapter i mod A (A = 0: the base alone, which shows
what the adapters cost). tokens/s = all answer tokens / wall time; tokens per CPU-second = the same
tokens / the CPU time the server process used meanwhile, which other work on a shared machine
changes much less than wall time; latency = request sent to last token. "one at a time" rows: the same requests, sequentially,
through the server (1 client) and through `qlora generate`'s `generate_ids` on the model
`load_with_adapter` builds (in this process, the server stopped; it stops at EOS, so it may answer
fewer tokens). Memory: the server's RSS before and after loading every adapter through
POST /v1/adapters, and the bytes of the adapters' stacked A/B (GET /stats).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOPICS = ["a lighthouse", "the moon", "a lost key", "two rivers", "an old map", "a violin", "winter bees", "a robot cook",
          "the last train", "glass mountains", "a quiet library", "red kites", "a paper boat", "the tide", "a sleepy dragon",
          "salt roads"]  # fmt: skip


def make_adapters(model: str, n: int, rank: int, out: Path) -> list[Path]:
    import torch

    from qlora_engine import add_lora, load_model, save_adapter
    from qlora_engine.lora import lora_layers

    m = load_model(model, progress=False)
    add_lora(m, r=rank, alpha=2 * rank, target_modules="all-linear", seed=0)
    g = torch.Generator().manual_seed(0)
    dirs = []
    for i in range(n):
        with torch.no_grad():
            for layer in lora_layers(m).values():
                layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) / layer.lora_A.shape[1] ** 0.5)
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.02)
        dirs.append(save_adapter(m, out / f"ad{i}", base_model=str(model)))
    return dirs


def cpu_of(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used: unlike wall time, what its work costs
    whatever else runs on the machine."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def start_server(a, log: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    cmd = [sys.executable, "-m", "qlora_engine", "serve", "--model", a.model, "--base-name", "base", "--port", "0",
           "--log-level", "warning", "--device", a.device, "--max-batch", str(a.max_batch)]  # fmt: skip
    out = open(log, "w")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **({"OMP_NUM_THREADS": str(a.threads)} if a.threads else {})}
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = None
    while url is None:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {log.read_text()[-2000:]}")
        for line in log.read_text().splitlines():
            if line.startswith("qlora serve:") and "http://" in line:
                url = "http://" + line.split("http://", 1)[1].split("/", 1)[0]
        time.sleep(0.1)
    while True:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)


async def one_request(client, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise SystemExit(f"request failed: {r.status_code} {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise SystemExit(f"request failed: {chunk['error']}")
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"latency": time.perf_counter() - t0, "ttft": first or 0.0, "tokens": tokens}


async def run_load(url: str, clients: int, adapters: int, requests: int, max_tokens: int) -> dict:
    import httpx

    queue = list(range(requests))
    results = []

    async def worker(client):
        while queue:
            i = queue.pop(0)
            prompt = f"Write a short story about {TOPICS[i % len(TOPICS)]}."
            model = f"ad{i % adapters}" if adapters else "base"
            results.append(await one_request(client, url, model, prompt, max_tokens))

    async with httpx.AsyncClient(timeout=3600) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        wall = time.perf_counter() - t0
    return summarize(results, wall)


def summarize(results: list[dict], wall: float) -> dict:
    lat = sorted(r["latency"] for r in results)
    p95 = lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))]
    return {"tokens": sum(r["tokens"] for r in results), "wall": wall, "tok_s": sum(r["tokens"] for r in results) / wall,
            "p50": statistics.median(lat), "p95": p95, "ttft50": statistics.median(r["ttft"] for r in results)}  # fmt: skip


def generate_one_at_a_time(a, adapter: Path, requests: int) -> dict:
    """The same prompts through `generate_ids` (qlora generate), one at a time."""
    import torch

    from qlora_engine import load_tokenizer, load_with_adapter
    from qlora_engine.generate import generate_ids

    if a.threads:
        torch.set_num_threads(a.threads)
    model = load_with_adapter(a.model, adapter, a.device)
    tok = load_tokenizer(a.model)
    generate_ids(model, tok, "Hello", max_new_tokens=2)  # warm-up, as the server's
    results = []
    t_all, cpu = time.perf_counter(), time.process_time()
    for i in range(requests):
        t0 = time.perf_counter()
        first = []
        _, new = generate_ids(model, tok, f"Write a short story about {TOPICS[i % len(TOPICS)]}.", max_new_tokens=a.max_tokens,
                              on_text=lambda s: first.append(time.perf_counter() - t0) if not first else None)  # fmt: skip
        results.append({"latency": time.perf_counter() - t0, "ttft": first[0] if first else 0.0, "tokens": len(new)})
    return {**summarize(results, time.perf_counter() - t_all), "cpu": time.process_time() - cpu}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--device", default="cpu")
    p.add_argument("--requests", type=int, default=16, help="requests per setting [16]")
    p.add_argument("--max-tokens", type=int, default=24, help="answer tokens per request [24]")
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--adapters", default="0,1,4,16", help="adapters the requests are spread over; 0: the base alone")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the server and of the generate_ids peer; 0: torch's default. On a shared CPU, "
                        "more threads than free cores make OpenMP spin for seconds a step [1]")  # fmt: skip
    p.add_argument("--write", help="write the markdown table to this file")
    a = p.parse_args()
    clients = [int(x) for x in a.clients.split(",")]
    counts = [int(x) for x in a.adapters.split(",")]

    import httpx
    import torch

    from qlora_engine import resolve_model
    from qlora_engine.machine import describe, fmt_bytes

    a.model = str(resolve_model(a.model))
    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    load_start = os.getloadavg()[0]
    dirs = make_adapters(a.model, max(counts), a.rank, tmp)
    proc, url = start_server(a, tmp / "server.log")
    rows, memory = [], {}
    try:
        time.sleep(2)  # let the warm-up step and the allocator settle before the baseline
        memory["rss_before"] = rss_of(proc.pid)
        for i, d in enumerate(dirs):
            r = httpx.post(url + "/v1/adapters", json={"name": f"ad{i}", "path": str(d)}, timeout=600)
            r.raise_for_status()
            memory["adapter_bytes"] = r.json()["bytes"]
        memory.setdefault("adapter_bytes", 0)
        memory["rss_after"] = rss_of(proc.pid)
        memory["bank_bytes"] = httpx.get(url + "/stats").json()["adapter_bytes"]
        asyncio.run(run_load(url, 1, 1, 1, 4))  # warm-up through HTTP
        for c in clients:
            for n in counts:
                before, cpu = httpx.get(url + "/stats").json(), cpu_of(proc.pid)
                res = asyncio.run(run_load(url, c, n, a.requests, a.max_tokens))
                after, res["cpu"] = httpx.get(url + "/stats").json(), cpu_of(proc.pid) - cpu
                steps = after["steps"] - before["steps"]
                decoded = (after["tokens"] - before["tokens"]) - (after["prefills"] - before["prefills"])
                res.update(clients=c, adapters=n, batch=decoded / max(steps, 1))
                rows.append(res)
                print(f"clients {c:>2}, adapters {n:>2}: {res['tok_s']:.1f} tokens/s, p50 {res['p50']:.2f} s, "
                      f"p95 {res['p95']:.2f} s, first token p50 {res['ttft50']:.2f} s, "
                      f"{res['tokens'] / res['cpu']:.1f} tokens per CPU-second", flush=True)  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(120)
    peer = generate_one_at_a_time(a, dirs[0], a.requests)
    print(f"generate_ids one at a time: {peer['tok_s']:.1f} tokens/s, p50 {peer['p50']:.2f} s", flush=True)

    load_end = os.getloadavg()[0]
    per_adapter = (memory["rss_after"] - memory["rss_before"]) / max(len(dirs), 1)
    base1 = {r["adapters"]: r for r in rows if r["clients"] == 1}
    cmd = "python scripts/bench_serve.py " + " ".join(sys.argv[1:])
    lines = [f"`qlora serve`, {Path(a.model).name} (NF4 base), adapters of rank {a.rank} on every linear "
             f"layer; {a.requests} chat requests per setting, {a.max_tokens} answer tokens each (greedy, ignore_eos), "
             "streamed; request i on adapter i mod A",  # fmt: skip
             f"machine: {describe(a.device)}; torch {torch.__version__}; torch threads (server and peer): "
             f"{a.threads or 'default'}; 1-minute load average {load_start:.1f} at the start, {load_end:.1f} at the end "
             "(the machine is shared)",
             f"command: `{cmd.strip()}`", "",
             "| clients | adapters | tokens/s | vs one at a time | tokens per CPU-second | vs one at a time "
             "| latency p50 (s) | p95 (s) | first token p50 (s) | rows per decode step |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        ref = base1.get(r["adapters"])
        eff = r["tokens"] / r["cpu"]
        speed = f"{r['tok_s'] / ref['tok_s']:.2f}x" if ref else ""
        work = f"{eff / (ref['tokens'] / ref['cpu']):.2f}x" if ref else ""
        lines.append(f"| {r['clients']} | {r['adapters'] or 'none (base)'} | {r['tok_s']:.1f} | {speed} | {eff:.1f} | {work} | "
                     f"{r['p50']:.2f} | {r['p95']:.2f} | {r['ttft50']:.2f} | {r['batch']:.1f} |")  # fmt: skip
    lines.append(f"| 1, `generate_ids` (qlora generate) | 1 | {peer['tok_s']:.1f} | | {peer['tokens'] / peer['cpu']:.1f} | | "
                 f"{peer['p50']:.2f} | {peer['p95']:.2f} | {peer['ttft50']:.2f} | 1 |")  # fmt: skip
    lines += ["", f"Memory: {len(dirs)} adapters loaded through POST /v1/adapters raised the server's RSS from "
              f"{fmt_bytes(memory['rss_before'])} to {fmt_bytes(memory['rss_after'])}: {fmt_bytes(per_adapter)} per adapter; "
              f"each adapter's A/B in bf16 is {fmt_bytes(memory['adapter_bytes'])} (stacked: {fmt_bytes(memory['bank_bytes'])} "
              "for all)."]  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    if a.write:
        Path(a.write).write_text(text)


if __name__ == "__main__":
    main()
