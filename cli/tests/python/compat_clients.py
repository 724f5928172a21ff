"""Drives the official `openai` (Responses API) and `anthropic` (Messages API) Python clients
through llm-warden.

Usage:
    compat_clients.py PROXY_URL MODEL [ADMIN_URL PROVIDER STATUS_MODEL]

Sends, with MODEL: `client.responses.create` (not streamed, then streamed) and
`client.messages.create` then `client.messages.stream`. With ADMIN_URL, while the
`messages.stream` is answering it checks that the proxy's /status shows the request in
flight (`active_requests` 1) and asks the admin API to unload the model: the unload must
wait for the stream, which must end whole. When $WARDEN_PY_REPORT names a file, writes
{"requests": n, "prompt_tokens": n, "completion_tokens": n} as the clients saw them (Anthropic
prompt tokens: `input_tokens` + `cache_read_input_tokens` + `cache_creation_input_tokens`).
Exits 1 naming the failed check; prints `compat clients: N checks passed` on success.

With $WARDEN_TRANSCRIBE=1 (Ollama), also `client.audio.transcriptions.create` (JSON, then
`response_format="text"`) between the two: two requests without tokens.

$WARDEN_STREAM_MAX_TOKENS (default 64) and $WARDEN_STREAM_EXTRA (a JSON object sent as extra
body fields, e.g. {"ignore_eos": true} for llama-server) shape the streamed requests, so that
a fast real model streams several tokens and is still answering when the script looks at
/status. $WARDEN_CLIENT_TIMEOUT: seconds per request (default 30).
"""

import importlib.metadata
import json
import os
import sys
import threading
import traceback
import urllib.request

for _var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
    os.environ.pop(_var, None)
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "*"
for _var in ("OPENAI_BASE_URL", "ANTHROPIC_BASE_URL", "ANTHROPIC_AUTH_TOKEN"):
    os.environ.pop(_var, None)

import anthropic  # noqa: E402
import openai  # noqa: E402

# Per request; a real model on a busy machine may need more ($WARDEN_CLIENT_TIMEOUT).
TIMEOUT = float(os.environ.get("WARDEN_CLIENT_TIMEOUT", "30"))


class CheckFailed(Exception):
    pass


class Checks:
    def __init__(self):
        self.passed = 0
        self.section = ""
        self.report = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}

    def check(self, cond, what, detail=None):
        if not cond:
            msg = f"[{self.section}] check failed: {what}"
            if detail is not None:
                msg += f"\n    got: {detail!r}"
            raise CheckFailed(msg)
        self.passed += 1

    def positive(self, n, what):
        self.check(isinstance(n, int) and n > 0, f"{what} > 0", n)

    def sent(self, prompt_tokens, completion_tokens):
        self.report["requests"] += 1
        self.report["prompt_tokens"] += prompt_tokens
        self.report["completion_tokens"] += completion_tokens


def anthropic_prompt(usage):
    return (
        usage.input_tokens
        + (getattr(usage, "cache_read_input_tokens", None) or 0)
        + (getattr(usage, "cache_creation_input_tokens", None) or 0)
    )


def http_json(method, url):
    # Not a form post (urllib's default type): the admin API refuses those (CSRF).
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
        return r.status, json.loads(r.read() or b"null")


def responses(c: Checks, url: str, model: str):
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)
    c.section = "openai responses.create"
    r = client.responses.create(
        model=model,
        instructions="You are terse.",
        max_output_tokens=48,
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Why is the sky blue?"}]}],
    )
    c.check(r.status == "completed", "status completed", r.status)
    c.check(r.output_text.strip(), "output_text is non-empty", r.output_text)
    c.positive(r.usage.input_tokens, "usage.input_tokens")
    c.positive(r.usage.output_tokens, "usage.output_tokens")
    c.sent(r.usage.input_tokens, r.usage.output_tokens)

    c.section = "openai responses.create stream"
    deltas, completed = [], None
    for event in client.responses.create(
        model=model,
        input="Say hello.",
        max_output_tokens=48,
        stream=True,
        extra_body=json.loads(os.environ.get("WARDEN_STREAM_EXTRA", "{}")),
    ):
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        elif event.type == "response.completed":
            completed = event.response
    c.check(completed is not None, "the stream ends with response.completed")
    c.check("".join(deltas).strip(), "streamed text is non-empty", deltas)
    c.check(len(deltas) > 1, "several deltas", deltas)
    c.positive(completed.usage.input_tokens, "completed usage.input_tokens")
    c.positive(completed.usage.output_tokens, "completed usage.output_tokens")
    c.sent(completed.usage.input_tokens, completed.usage.output_tokens)


def transcriptions(c: Checks, url: str, model: str):
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)
    # A WAV header and a little silence: the simulator does not listen.
    wav = b"RIFF\x24\x10\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00" + bytes(4096)
    c.section = "openai audio.transcriptions.create"
    t = client.audio.transcriptions.create(
        model=model, file=("hello.wav", wav, "audio/wav"), language="en"
    )
    c.check(t.text and t.text == t.text.strip(), "text is non-empty and trimmed", t)
    c.sent(0, 0)
    c.section = "openai audio.transcriptions.create text"
    text = client.audio.transcriptions.create(
        model=model, file=("hello.wav", wav, "audio/wav"), response_format="text"
    )
    c.check(isinstance(text, str) and text.strip(), "the bare text", text)
    c.sent(0, 0)


def messages(c: Checks, url: str, model: str, admin):
    client = anthropic.Anthropic(base_url=url, api_key="unused", timeout=TIMEOUT, max_retries=0)
    c.section = "anthropic messages.create"
    m = client.messages.create(
        model=model,
        max_tokens=64,
        system="You are terse.",
        messages=[{"role": "user", "content": [{"type": "text", "text": "Why is the sky blue?"}]}],
    )
    c.check(m.type == "message" and m.role == "assistant", "a message from the assistant", m)
    text = "".join(b.text for b in m.content if b.type == "text")
    c.check(text.strip(), "text is non-empty", m.content)
    c.check(m.stop_reason in ("end_turn", "max_tokens"), "stop_reason", m.stop_reason)
    c.positive(anthropic_prompt(m.usage), "prompt tokens")
    c.positive(m.usage.output_tokens, "usage.output_tokens")
    c.sent(anthropic_prompt(m.usage), m.usage.output_tokens)

    c.section = "anthropic messages.stream"
    unload = {}
    with client.messages.stream(
        model=model,
        max_tokens=int(os.environ.get("WARDEN_STREAM_MAX_TOKENS", "64")),
        messages=[{"role": "user", "content": "Say hello."}],
        extra_body=json.loads(os.environ.get("WARDEN_STREAM_EXTRA", "{}")),
    ) as stream:
        pieces = []
        for text in stream.text_stream:
            pieces.append(text)
            if admin and len(pieces) == 1:
                admin_url, provider, status_model = admin
                _, s = http_json("GET", admin_url + "/status")
                entry = [e for e in s["models"] if e["provider"] == provider and e["model"] == status_model]
                c.check(entry and entry[0]["active_requests"] == 1, "active_requests 1 while it streams", entry)

                def ask():
                    try:
                        unload["status"], _ = http_json(
                            "POST", f"{admin_url}/models/{provider}/{status_model}/unload")
                    except Exception as e:  # reported by the check below
                        unload["error"] = repr(e)

                unload["thread"] = threading.Thread(target=ask)
                unload["thread"].start()
        final = stream.get_final_message()
    c.check("".join(pieces).strip(), "streamed text is non-empty", pieces)
    c.check(len(pieces) > 1, "several text deltas", pieces)
    c.check(final.stop_reason in ("end_turn", "max_tokens"), "final stop_reason", final.stop_reason)
    c.positive(anthropic_prompt(final.usage), "final prompt tokens")
    c.positive(final.usage.output_tokens, "final usage.output_tokens")
    c.sent(anthropic_prompt(final.usage), final.usage.output_tokens)
    if admin:
        unload["thread"].join(TIMEOUT)
        c.check(unload.get("status") == 200, "the admin unload succeeded after the stream", unload)


def main(argv):
    if len(argv) not in (3, 6):
        print(__doc__, file=sys.stderr)
        return 2
    url, model = argv[1], argv[2]
    admin = tuple(argv[3:6]) if len(argv) == 6 else None
    versions = {d: importlib.metadata.version(d) for d in ("openai", "anthropic")}
    print(f"openai {versions['openai']} / anthropic {versions['anthropic']}; {url} {model}")
    c = Checks()
    try:
        responses(c, url, model)
        if os.environ.get("WARDEN_TRANSCRIBE") == "1":
            transcriptions(c, url, model)
        messages(c, url, model, admin)
    except CheckFailed as e:
        print(f"compat clients: FAILED after {c.passed} checks\n{e}", file=sys.stderr)
        return 1
    except Exception as e:
        traceback.print_exc()
        print(
            f"compat clients: FAILED after {c.passed} checks\n[{c.section}] "
            f"the client raised {type(e).__name__}: {e}",
            file=sys.stderr,
        )
        return 1
    report = os.environ.get("WARDEN_PY_REPORT")
    if report:
        with open(report, "w") as f:
            json.dump(c.report, f, indent=2, sort_keys=True)
    print(f"compat clients: {c.passed} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
