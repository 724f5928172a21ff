"""Sends one over-window Anthropic Messages conversation (tool_use / tool_result pairs) with
the official `anthropic` client, and checks that the client reads the compacted reply.

Usage: compacted_messages.py BASE_URL MODEL. Prints "compacted messages: ok <header>".
"""
import sys

import anthropic

FILLER = "the quick brown fox jumps over the lazy dog while it rains " * 7


def conversation(loops):
    m = []
    for i in range(loops):
        m.append({"role": "user", "content": f"turn {i}: {FILLER}"})
        m.append({"role": "assistant", "content": [
            {"type": "text", "text": f"reading {i}"},
            {"type": "tool_use", "id": f"toolu_{i}", "name": "read", "input": {"path": f"f{i}"}},
        ]})
        m.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": f"toolu_{i}", "content": f"file {i}: {FILLER}"},
        ]})
        m.append({"role": "assistant", "content": f"answer {i}: {FILLER}"})
    m.append({"role": "user", "content": "and finally, what did we read first?"})
    return m


def main(argv):
    url, model = argv[1], argv[2]
    client = anthropic.Anthropic(base_url=url, api_key="unused", timeout=60, max_retries=0)
    raw = client.messages.with_raw_response.create(
        model=model,
        max_tokens=64,
        system="You are terse.",
        tools=[{"name": "read", "description": "read a file",
                "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}}],
        messages=conversation(12),
    )
    header = raw.headers.get("x-llm-warden-compacted")
    m = raw.parse()
    if not header:
        print("compacted messages: FAILED: no x-llm-warden-compacted header", file=sys.stderr)
        return 1
    if m.type != "message" or m.role != "assistant" or not m.content:
        print(f"compacted messages: FAILED: {m!r}", file=sys.stderr)
        return 1
    print(f"compacted messages: ok {header}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
