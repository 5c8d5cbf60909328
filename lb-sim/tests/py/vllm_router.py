"""vllm-router 0.1.17 in front of two vllm-sim instances: streaming and not, cache_aware and kv_aware.

Usage: python vllm_router.py URL0 URL1 [KV_PUB0 KV_REPLAY0 KV_PUB1 KV_REPLAY1]
Starts `vllm-router` (next to this interpreter) on free loopback ports and stops it by PID.
"""
import os
import socket
import subprocess
import sys
import time
import urllib.request

import openai

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_router(workers, policy, extra=()):
    port, prom = free_port(), free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "vllm-router")
    log = open(os.devnull, "w") if not os.environ.get("SIM_ROUTER_LOG") else None
    proc = subprocess.Popen(
        [exe, "--host", "127.0.0.1", "--port", str(port),
         "--prometheus-host", "127.0.0.1", "--prometheus-port", str(prom),
         "--worker-urls", *workers, "--policy", policy, *extra],
        stdout=log, stderr=log,
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm-router exited with {proc.returncode}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            proc.prom_port = prom
            return proc, port
        except Exception:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("vllm-router did not become ready")


def exercise(port, label):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-none",
                           max_retries=0, timeout=60)
    system = f"{label}: a long shared system prompt for routing. " * 30
    cached = []
    for i in range(4):
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": f"q{i}"}]
        r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4)
        assert r.usage.completion_tokens == 4
        cached.append(r.usage.prompt_tokens_details.cached_tokens)
        time.sleep(0.3)  # let KV events / tree updates land
    # Streaming through the router, with usage.
    text, usage = "", None
    for ch in client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "stream"}], max_tokens=6,
            stream=True, stream_options={"include_usage": True}):
        if ch.usage is not None:
            usage = ch.usage
        elif ch.choices:
            text += ch.choices[0].delta.content or ""
    assert usage is not None and usage.completion_tokens == 6 and len(text) == 24, (usage, text)
    c = client.completions.create(model=MODEL, prompt="hello router", max_tokens=3)
    assert c.usage.completion_tokens == 3
    parts = list(client.completions.create(model=MODEL, prompt="hello router", max_tokens=3, stream=True))
    assert sum(1 for p in parts if p.choices) >= 1
    return cached


def main() -> None:
    urls = sys.argv[1:3]
    kv = sys.argv[3:7]
    proc, port = start_router(urls, "cache_aware")
    try:
        cached = exercise(port, "cache-aware")
        # cache_aware keeps a shared prefix on one worker: later requests hit.
        assert all(c > 0 for c in cached[1:]), cached
        print("vllm-router cache_aware:", cached)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    proc, port = start_router(urls, "round_robin")
    try:
        exercise(port, "round-robin")
        print("vllm-router round_robin: ok")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    if kv:
        extra = ["--kv-event-block-size", "16", "--kv-event-model", MODEL]
        for u, (p, r) in zip(urls, [(kv[0], kv[1]), (kv[2], kv[3])]):
            extra += ["--kv-event-source", f"{u}=tcp://127.0.0.1:{p}",
                      "--kv-event-replay-source", f"{u}=tcp://127.0.0.1:{r}"]
        proc, port = start_router(urls, "kv_aware", extra)
        try:
            time.sleep(1.0)  # subscriptions
            cached = exercise(port, "kv-aware")
            assert all(c > 0 for c in cached[1:]), cached
            print("vllm-router kv_aware:", cached)
            metrics = urllib.request.urlopen(
                f"http://127.0.0.1:{proc.prom_port}/metrics", timeout=5).read().decode()
            kv_lines = [l for l in metrics.splitlines() if "kv" in l and not l.startswith("#")]
            print("\n".join(kv_lines[:20]))
            # The router's exact KV index (built from our ZMQ events) found the shared prefix.
            hits = [float(l.rsplit(" ", 1)[1]) for l in kv_lines
                    if l.startswith('vllm_router_kv_placement_lookups_total{result="hit"}')]
            assert hits and hits[0] >= 3, kv_lines
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    print("vllm-router: ok")


if __name__ == "__main__":
    main()
