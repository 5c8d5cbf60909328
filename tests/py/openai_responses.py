"""Responses API chains through agentlb with the real OpenAI SDK.

Usage: openai_responses.py MODEL CHAINS TURNS URL [URL ...]

For each of CHAINS chains (half streaming, half not), creates a response and continues
it TURNS times with `previous_response_id`, sending call k to URL[k % len(URL)] (as a
client behind a load balancer in front of several agentlb replicas would), then retrieves
the last response through the next URL. Prints JSON: calls, errors (with their kind),
and the cached tokens each continuation reported.
"""

import json
import sys

import openai

model, chains, turns, urls = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
clients = [openai.OpenAI(base_url=u + "/v1", api_key="x", max_retries=0, timeout=30) for u in urls]
out = {"calls": 0, "errors": [], "cached": [], "retrieved": 0}
k = 0


def client():
    global k
    c = clients[k % len(clients)]
    k += 1
    return c


def create(stream, prev, text):
    c = client()
    out["calls"] += 1
    args = dict(model=model, input=text, max_output_tokens=8, previous_response_id=prev)
    if not stream:
        r = c.responses.create(**args)
        return r.id, r.usage
    final = None
    created = None
    for ev in c.responses.create(stream=True, **args):
        if ev.type == "response.created":
            created = ev.response.id
        if ev.type == "response.completed":
            final = ev.response
    assert final is not None, "stream ended without response.completed"
    assert created == final.id, "response.created and response.completed ids differ"
    return final.id, final.usage


for chain in range(chains):
    stream = chain % 2 == 1
    prev = None
    try:
        for turn in range(turns + 1):
            text = f"chain {chain} turn {turn}: " + "please continue the analysis of the data. " * (40 if turn == 0 else 3)
            prev, usage = create(stream, prev, text)
            if turn > 0:
                out["cached"].append(usage.input_tokens_details.cached_tokens)
        got = client().responses.retrieve(prev)
        assert got.id == prev
        out["retrieved"] += 1
    except openai.APIStatusError as e:
        out["errors"].append({"chain": chain, "status": e.status_code, "body": str(e.body)[:300]})
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        out["errors"].append({"chain": chain, "kind": type(e).__name__, "message": str(e)[:300]})

print(json.dumps(out))
