"""Drives agentlb with the official OpenAI Python SDK: chat (plain and streamed with
usage), legacy completions, and models. Prints one JSON object with what it saw."""
import json
import sys

import openai

base, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base + "/v1", api_key="not-needed", max_retries=0, timeout=30)
hdrs = {"X-Workflow-Id": "py-wf", "X-Agent-Id": "py-agent"}
out = {}

r = client.chat.completions.create(
    model=model,
    messages=[{"role": "system", "content": "You are a planner. " * 40},
              {"role": "user", "content": "plan the task"}],
    max_tokens=8,
    extra_headers=hdrs,
)
out["chat"] = {"text": r.choices[0].message.content, "usage": r.usage.model_dump()}

chunks, text, usage = 0, "", None
stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "system", "content": "You are a planner. " * 40},
              {"role": "user", "content": "plan the next step"}],
    max_tokens=12,
    stream=True,
    stream_options={"include_usage": True},
    extra_headers=hdrs,
)
for ch in stream:
    chunks += 1
    if ch.choices:
        text += ch.choices[0].delta.content or ""
    if ch.usage:
        usage = ch.usage.model_dump()
out["stream"] = {"chunks": chunks, "text": text, "usage": usage}

c = client.completions.create(model=model, prompt="hello there", max_tokens=5, extra_headers=hdrs)
out["completion"] = {"text": c.choices[0].text, "usage": c.usage.model_dump()}

s = client.completions.create(model=model, prompt="hello again", max_tokens=6, stream=True, extra_headers=hdrs)
out["completion_stream_chunks"] = sum(1 for _ in s)

out["models"] = [m.id for m in client.models.list().data]

try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    out["unknown_model"] = "no error"
except openai.NotFoundError as e:
    out["unknown_model"] = {"status": e.status_code, "code": e.code}

print(json.dumps(out))
