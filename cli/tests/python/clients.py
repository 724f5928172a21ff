"""Drives the official Python clients (`ollama`, `openai`) through llm-warden.

Usage:
    clients.py [OLLAMA_PROXY_URL [LMSTUDIO_PROXY_URL]]

URLs not given on the command line come from $WARDEN_OLLAMA_URL and $WARDEN_LMSTUDIO_URL
(e.g. http://127.0.0.1:11435 and http://127.0.0.1:1235: the proxy's listeners, not the
providers). When $WARDEN_PY_REPORT names a file, a JSON report of what the script sent and
the token counts it saw is written there:

    {"ollama": {"<model>": {"requests": n, "prompt_tokens": n, "completion_tokens": n}},
     "lmstudio": {...}}

so the caller can check the proxy's /status against it. Exits 1 with a message naming the
failed check; prints `python clients: N checks passed` on success.
"""

import importlib.metadata
import json
import os
import sys
import traceback

# Talk to the proxy directly, whatever the environment says about HTTP proxies.
for _var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
    os.environ.pop(_var, None)
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "*"

import httpx  # noqa: E402  (a dependency of both clients)
import ollama  # noqa: E402
import openai  # noqa: E402

OLLAMA_CHAT_MODEL = "llama3.2"
OLLAMA_EMBED_MODEL = "nomic-embed-text"
OLLAMA_V1_CHAT_MODEL = "qwen2.5:7b"
OLLAMA_V1_EMBED_MODEL = "nomic-embed-text:latest"
LMS_CHAT_MODEL = "qwen2.5-7b-instruct"
LMS_EMBED_MODEL = "text-embedding-nomic-embed-text-v1.5"

TIMEOUT = 20.0


class CheckFailed(Exception):
    pass


class Checks:
    def __init__(self):
        self.passed = 0
        self.section = ""
        # listener -> model -> counters, as the script saw them.
        self.report = {"ollama": {}, "lmstudio": {}}

    def check(self, cond, what, detail=None):
        if not cond:
            msg = f"[{self.section}] check failed: {what}"
            if detail is not None:
                msg += f"\n    got: {detail!r}"
            raise CheckFailed(msg)
        self.passed += 1

    def eq(self, got, want, what):
        self.check(got == want, f"{what}: expected {want!r}", got)

    def positive(self, n, what):
        self.check(isinstance(n, int) and n > 0, f"{what} > 0", n)

    def sent(self, listener, model, prompt_tokens=0, completion_tokens=0):
        m = self.report[listener].setdefault(
            model, {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
        )
        m["requests"] += 1
        m["prompt_tokens"] += prompt_tokens or 0
        m["completion_tokens"] += completion_tokens or 0


def same_model(got, want):
    """Ollama echoes the name as asked; allow the implied `:latest`."""
    return got == want or got == want + ":latest" or got + ":latest" == want


# === ollama client, native API ===


def ollama_native(c: Checks, url: str):
    client = ollama.Client(host=url, timeout=TIMEOUT, trust_env=False)

    c.section = "ollama list"
    listed = client.list()
    names = [m.model for m in listed.models]
    c.check(len(names) > 0, "list returns models", names)
    for want in (OLLAMA_CHAT_MODEL + ":latest", OLLAMA_EMBED_MODEL + ":latest", OLLAMA_V1_CHAT_MODEL):
        c.check(want in names, f"{want} is listed", names)
    for m in listed.models:
        c.positive(m.size, f"{m.model}.size")
        c.check(m.modified_at is not None, f"{m.model}.modified_at parses", m.modified_at)
        c.check(m.details is not None and m.details.family, f"{m.model}.details.family", m.details)

    c.section = "ollama show"
    shown = client.show(OLLAMA_CHAT_MODEL)
    c.check(shown.details is not None and shown.details.family, "show.details.family", shown.details)
    c.check(shown.modelinfo, "show.modelinfo is non-empty", shown.modelinfo)
    c.check(shown.capabilities and "completion" in shown.capabilities, "show.capabilities has completion", shown.capabilities)

    c.section = "ollama chat"
    msgs = [{"role": "user", "content": "Why is the sky blue?"}]
    r = client.chat(model=OLLAMA_CHAT_MODEL, messages=msgs)
    c.check(same_model(r.model, OLLAMA_CHAT_MODEL), "chat echoes the model", r.model)
    c.check(r.done, "chat is done", r.done)
    c.eq(r.message.role, "assistant", "chat message role")
    c.check(r.message.content and r.message.content.strip(), "chat content is non-empty", r.message.content)
    c.positive(r.prompt_eval_count, "chat prompt_eval_count")
    c.positive(r.eval_count, "chat eval_count")
    c.check(r.done_reason in ("stop", "length"), "chat done_reason", r.done_reason)
    c.sent("ollama", OLLAMA_CHAT_MODEL, r.prompt_eval_count, r.eval_count)

    c.section = "ollama chat stream"
    parts, last, chunks = [], None, 0
    for chunk in client.chat(model=OLLAMA_CHAT_MODEL, messages=msgs, stream=True):
        chunks += 1
        c.check(same_model(chunk.model, OLLAMA_CHAT_MODEL), "every chunk echoes the model", chunk.model)
        c.check(last is None or not last.done, "no chunk after done", chunk)
        if chunk.message.content:
            parts.append(chunk.message.content)
        last = chunk
    c.check(last is not None and last.done, "the stream ends with done", last)
    text = "".join(parts)
    c.check(text.strip(), "streamed text is non-empty", text)
    c.check(chunks > 1, "the reply came in several chunks", chunks)
    c.positive(last.prompt_eval_count, "stream prompt_eval_count")
    c.positive(last.eval_count, "stream eval_count")
    c.eq(len(parts), last.eval_count, "one content chunk per counted token")
    c.sent("ollama", OLLAMA_CHAT_MODEL, last.prompt_eval_count, last.eval_count)

    c.section = "ollama generate"
    g = client.generate(model=OLLAMA_CHAT_MODEL, prompt="Say hello.", options={"num_predict": 4})
    c.check(same_model(g.model, OLLAMA_CHAT_MODEL), "generate echoes the model", g.model)
    c.check(g.done, "generate is done", g.done)
    c.check(g.response and g.response.strip(), "generate response is non-empty", g.response)
    c.positive(g.prompt_eval_count, "generate prompt_eval_count")
    c.positive(g.eval_count, "generate eval_count")
    c.check(g.eval_count <= 4, "num_predict caps eval_count", g.eval_count)
    c.sent("ollama", OLLAMA_CHAT_MODEL, g.prompt_eval_count, g.eval_count)

    c.section = "ollama ps"
    running = client.ps()
    loaded = [m.model for m in running.models]
    c.check(any(same_model(n, OLLAMA_CHAT_MODEL) for n in loaded), f"{OLLAMA_CHAT_MODEL} is loaded", loaded)
    for m in running.models:
        c.positive(m.size, f"ps {m.model}.size")
        c.check(m.expires_at is not None, f"ps {m.model}.expires_at parses", m.expires_at)

    c.section = "ollama embed"
    inputs = ["the sky is blue", "the sea is green"]
    e = client.embed(model=OLLAMA_EMBED_MODEL, input=inputs)
    c.check(same_model(e.model, OLLAMA_EMBED_MODEL), "embed echoes the model", e.model)
    c.eq(len(e.embeddings), len(inputs), "one embedding per input")
    dims = {len(v) for v in e.embeddings}
    c.check(len(dims) == 1 and dims.pop() > 0, "embeddings have one non-zero length", e.embeddings)
    c.check(all(isinstance(x, float) for v in e.embeddings for x in v), "embedding values are floats")
    c.positive(e.prompt_eval_count, "embed prompt_eval_count")
    c.sent("ollama", OLLAMA_EMBED_MODEL, e.prompt_eval_count, 0)


# === openai client, against either listener's /v1 ===


def openai_v1(c: Checks, listener: str, url: str, chat_model: str, embed_model: str):
    client = openai.OpenAI(
        base_url=url.rstrip("/") + "/v1",
        api_key="not-needed",
        timeout=TIMEOUT,
        max_retries=0,
        http_client=httpx.Client(trust_env=False, timeout=TIMEOUT),
    )
    tag = f"openai@{listener}"

    c.section = f"{tag} models"
    ids = [m.id for m in client.models.list()]
    c.check(ids, "models.list is non-empty", ids)
    for want in (chat_model, embed_model):
        c.check(any(same_model(i, want) for i in ids), f"{want} is listed", ids)

    msgs = [{"role": "user", "content": "Write a haiku about proxies."}]

    c.section = f"{tag} chat"
    r = client.chat.completions.create(model=chat_model, messages=msgs)
    c.check(same_model(r.model, chat_model), "chat echoes the model", r.model)
    c.eq(r.object, "chat.completion", "object")
    c.eq(len(r.choices), 1, "one choice")
    c.eq(r.choices[0].message.role, "assistant", "role")
    content = r.choices[0].message.content
    c.check(content and content.strip(), "content is non-empty", content)
    c.check(r.choices[0].finish_reason in ("stop", "length"), "finish_reason", r.choices[0].finish_reason)
    c.check(r.usage is not None, "usage is present", r)
    c.positive(r.usage.prompt_tokens, "usage.prompt_tokens")
    c.positive(r.usage.completion_tokens, "usage.completion_tokens")
    c.eq(r.usage.total_tokens, r.usage.prompt_tokens + r.usage.completion_tokens, "usage.total_tokens")
    c.sent(listener, chat_model, r.usage.prompt_tokens, r.usage.completion_tokens)

    def stream(include_usage):
        kw = {"stream_options": {"include_usage": True}} if include_usage else {}
        s = client.chat.completions.create(model=chat_model, messages=msgs, stream=True, **kw)
        deltas, finish, usage, ids, n = [], None, None, set(), 0
        for chunk in s:
            n += 1
            c.eq(chunk.object, "chat.completion.chunk", "chunk object")
            c.check(same_model(chunk.model, chat_model), "every chunk echoes the model", chunk.model)
            ids.add(chunk.id)
            c.check(usage is None, "no chunk after the usage chunk", chunk)
            if chunk.usage is not None:
                usage = chunk.usage
                c.eq(chunk.choices, [], "the usage chunk has no choices")
                continue
            c.check(chunk.choices, "a chunk without usage has a choice", chunk)
            ch = chunk.choices[0]
            if ch.delta.content:
                c.check(finish is None, "no content after finish_reason", chunk)
                deltas.append(ch.delta.content)
            if ch.finish_reason is not None:
                finish = ch.finish_reason
        c.eq(len(ids), 1, "one completion id across chunks")
        c.check(finish in ("stop", "length"), "the stream ends with a finish_reason", finish)
        text = "".join(deltas)
        c.check(text.strip(), "streamed text is non-empty", text)
        c.check(len(deltas) > 1, "the reply came in several deltas", deltas)
        return text, deltas, usage

    c.section = f"{tag} chat stream include_usage"
    text, deltas, usage = stream(True)
    c.check(usage is not None, "a usage chunk arrives when include_usage is set")
    c.positive(usage.prompt_tokens, "stream usage.prompt_tokens")
    c.positive(usage.completion_tokens, "stream usage.completion_tokens")
    c.eq(usage.total_tokens, usage.prompt_tokens + usage.completion_tokens, "stream usage.total_tokens")
    c.eq(len(deltas), usage.completion_tokens, "one delta per counted completion token")
    c.sent(listener, chat_model, usage.prompt_tokens, usage.completion_tokens)

    c.section = f"{tag} chat stream"
    text, deltas, usage = stream(False)
    c.check(usage is None, "no usage chunk unless asked for", usage)
    c.sent(listener, chat_model, 0, 0)

    c.section = f"{tag} embeddings"
    inputs = ["the sky is blue", "the sea is green", "proxies count tokens"]
    e = client.embeddings.create(model=embed_model, input=inputs)
    c.check(same_model(e.model, embed_model), "embeddings echo the model", e.model)
    c.eq(len(e.data), len(inputs), "one embedding per input")
    c.eq([d.index for d in e.data], list(range(len(inputs))), "embedding indexes")
    dims = {len(d.embedding) for d in e.data}
    c.check(len(dims) == 1 and min(dims) > 0, "embeddings have one non-zero length", dims)
    c.check(e.usage is not None, "embeddings usage is present", e)
    c.positive(e.usage.prompt_tokens, "embeddings usage.prompt_tokens")
    c.eq(e.usage.total_tokens, e.usage.prompt_tokens, "embeddings usage.total_tokens")
    c.sent(listener, embed_model, e.usage.prompt_tokens, 0)


def main(argv):
    ollama_url = argv[1] if len(argv) > 1 else os.environ.get("WARDEN_OLLAMA_URL")
    lms_url = argv[2] if len(argv) > 2 else os.environ.get("WARDEN_LMSTUDIO_URL")
    if not ollama_url or not lms_url:
        print(
            "usage: clients.py OLLAMA_PROXY_URL LMSTUDIO_PROXY_URL "
            "(or set WARDEN_OLLAMA_URL and WARDEN_LMSTUDIO_URL)",
            file=sys.stderr,
        )
        return 2
    versions = {d: importlib.metadata.version(d) for d in ("ollama", "openai")}
    print(f"ollama {versions['ollama']} / openai {versions['openai']}; "
          f"ollama listener {ollama_url}, lmstudio listener {lms_url}")

    c = Checks()
    try:
        ollama_native(c, ollama_url)
        openai_v1(c, "ollama", ollama_url, OLLAMA_V1_CHAT_MODEL, OLLAMA_V1_EMBED_MODEL)
        openai_v1(c, "lmstudio", lms_url, LMS_CHAT_MODEL, LMS_EMBED_MODEL)
    except CheckFailed as e:
        print(f"python clients: FAILED after {c.passed} checks\n{e}", file=sys.stderr)
        return 1
    except Exception as e:  # a client raised: the wire format did not suit it
        traceback.print_exc()
        print(
            f"python clients: FAILED after {c.passed} checks\n[{c.section}] "
            f"the client raised {type(e).__name__}: {e}",
            file=sys.stderr,
        )
        return 1

    report = os.environ.get("WARDEN_PY_REPORT")
    if report:
        with open(report, "w") as f:
            json.dump(c.report, f, indent=2, sort_keys=True)
    print(f"python clients: {c.passed} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
