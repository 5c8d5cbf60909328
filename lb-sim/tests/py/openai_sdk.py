"""The official `openai` SDK and `prometheus_client`'s parser against a running vllm-sim.

Usage: python openai_sdk.py BASE_URL   (e.g. http://127.0.0.1:9000)
Exits non-zero on the first failed check.
"""
import sys
import urllib.request

import openai
from prometheus_client.parser import text_string_to_metric_families

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def main() -> None:
    base = sys.argv[1].rstrip("/")
    client = openai.OpenAI(base_url=base + "/v1", api_key="sk-none", max_retries=0, timeout=60)
    system = "You are a meticulous assistant. " * 40
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "first"}]

    # Chat, non-streaming.
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8)
    assert r.object == "chat.completion", r
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    first_prompt = r.usage.prompt_tokens

    # Chat, streaming with include_usage: the second request shares the system prompt.
    msgs2 = [{"role": "system", "content": system}, {"role": "user", "content": "second"}]
    stream = client.chat.completions.create(
        model=MODEL, messages=msgs2, max_tokens=12, stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
            continue
        delta = chunk.choices[0].delta
        text += delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "length", finish
    assert usage is not None and usage.completion_tokens == 12, usage
    cached = usage.prompt_tokens_details.cached_tokens
    assert cached > 0 and cached % 16 == 0 and cached < first_prompt, (cached, first_prompt)
    assert len(text) == 12 * 4, text

    # Completions, both ways.
    c = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=5)
    assert c.object == "text_completion" and c.usage.completion_tokens == 5
    parts = list(client.completions.create(model=MODEL, prompt="The quick brown fox",
                                           max_tokens=5, stream=True))
    assert "".join(p.choices[0].text for p in parts if p.choices) == c.choices[0].text

    # Models endpoint.
    assert [m.id for m in client.models.list()] == [MODEL]

    # Errors are mapped by the SDK.
    try:
        client.chat.completions.create(model="nope", messages=msgs, max_tokens=1)
        raise AssertionError("expected NotFoundError")
    except openai.NotFoundError:
        pass
    try:
        client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=0)
        raise AssertionError("expected BadRequestError")
    except openai.BadRequestError:
        pass

    # /metrics parses with prometheus_client (the library vLLM itself uses).
    body = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    fams = {f.name: f for f in text_string_to_metric_families(body)}
    for name in ["vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_queries", "vllm:prefix_cache_hits",
                 "vllm:generation_tokens", "vllm:time_to_first_token_seconds",
                 "vllm:inter_token_latency_seconds", "vllm:e2e_request_latency_seconds"]:
        assert name in fams, (name, sorted(fams))
    hits = [s.value for s in fams["vllm:prefix_cache_hits"].samples if s.name.endswith("_total")]
    assert hits and hits[0] >= cached, hits
    ttft = [s for s in fams["vllm:time_to_first_token_seconds"].samples if s.name.endswith("_count")]
    assert ttft[0].value >= 4 and ttft[0].labels["model_name"] == MODEL and ttft[0].labels["engine"] == "0"
    print("openai sdk: ok")


if __name__ == "__main__":
    main()
