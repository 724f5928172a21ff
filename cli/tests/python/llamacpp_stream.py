"""Streams one chat through the proxy with the official `openai` client, against a real
llama-server behind it. Prints one JSON line: chunks seen, the text, and the usage if any."""
import json
import os
import sys

from openai import OpenAI

client = OpenAI(base_url=os.environ["WARDEN_LLAMA_URL"] + "/v1", api_key="none", max_retries=0)
stream = client.chat.completions.create(
    model=os.environ["WARDEN_MODEL"],
    messages=[{"role": "user", "content": "Say hello in five words."}],
    max_tokens=24,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
chunks, text, usage, finish = 0, "", None, None
for chunk in stream:
    chunks += 1
    if chunk.usage is not None:
        usage = chunk.usage.model_dump()
    for choice in chunk.choices:
        if choice.delta.content:
            text += choice.delta.content
        if choice.finish_reason:
            finish = choice.finish_reason
print(json.dumps({"chunks": chunks, "text": text, "usage": usage, "finish": finish}))
sys.exit(0 if chunks > 1 and text and finish else 1)
