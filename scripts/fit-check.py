#!/usr/bin/env python3
"""Issue 19, checked from outside: small windows and memory pressure must not refuse what
could be served.

    python3 scripts/fit-check.py target/release/llm-warden

Starts an independent fake Ollama (this file, stdlib only; it counts one token per word and
answers 500 when a prompt plus its reply room exceeds the runner's num_ctx, where the real
Ollama would silently cut the prompt) and the release binary in front of it, then:

1. window 512 (OLLAMA_CONTEXT_LENGTH=512): a 41-message conversation of ~1,000 words with a
   24-word system prompt and a 9-word last question is summarized (200, header; the system
   message and the last question arrive byte for byte; it fits), the identical resend is a
   summary-cache hit (no summarizer call), and the next turn reuses the summary;
2. critical memory pressure (thresholds set below this machine's use), buffers.context.initial
   = 1024, so loads get num_ctx 512: a 150-word single message asking num_predict 150 is
   served (200) in 512 (pressure's earlier compaction threshold does not refuse it); a
   350-word one, which 512 cannot hold, is served at a larger context named in
   x-llm-warden-context, and a model loaded at 512 before it is reloaded at that size.

Exits non-zero on the first broken promise. Builds nothing.
"""
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WORDS = ("the quick brown fox jumps over a lazy dog while seven green birds sing in an old tall tree "
         "near the river bank and children play with red kites under warm summer light").split()


def words(n, seed=0):
    return " ".join(WORDS[(i * 7 + seed) % len(WORDS)] for i in range(n))


class Fake:
    """What the checks read back: the bodies of chat requests and the loaded runners."""

    def __init__(self, default_ctx):
        self.default_ctx = default_ctx
        self.runners = {}  # model -> num_ctx
        self.loads = []  # (model, num_ctx)
        self.chats = []  # request bodies of /api/chat that were not summarizer calls
        self.summarizer_calls = 0
        self.lock = threading.Lock()


def handler_for(fake):
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def answer(self, status, obj):
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json; charset=utf-8")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/api/version":
                return self.answer(200, {"version": "0.13.0"})
            if self.path == "/api/tags":
                models = [{"name": m, "model": m, "size": 2_000_000_000, "digest": "0" * 64,
                           "details": {"family": "llama", "parameter_size": "3B"}}
                          for m in ("small:latest", "other:latest")]
                return self.answer(200, {"models": models})
            if self.path == "/api/ps":
                with fake.lock:
                    rows = [{"name": m, "model": m, "size": 2_100_000_000, "size_vram": 0,
                             "context_length": ctx, "expires_at": "2318-01-01T00:00:00Z"}
                            for m, ctx in fake.runners.items()]
                return self.answer(200, {"models": rows})
            if self.path == "/":
                return self.answer(200, "Ollama is running")
            self.answer(404, {"error": "not found"})

        def do_POST(self):
            n = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(n)
            try:
                req = json.loads(raw)
            except ValueError:
                return self.answer(400, {"error": "invalid JSON"})
            model = req.get("model", "")
            if ":" not in model:
                model += ":latest"
            if self.path == "/api/show":
                return self.answer(404, {"error": "no geometry here"})
            num_ctx = (req.get("options") or {}).get("num_ctx") or fake.default_ctx
            with fake.lock:
                if req.get("keep_alive") == 0:
                    fake.runners.pop(model, None)
                    return self.answer(200, {"model": model, "done": True, "done_reason": "unload"})
                if fake.runners.get(model) != num_ctx:
                    fake.runners[model] = num_ctx
                    fake.loads.append((model, num_ctx))
            if self.path == "/api/generate" and not req.get("prompt"):
                return self.answer(200, {"model": model, "done": True, "done_reason": "load"})
            if self.path != "/api/chat":
                return self.answer(404, {"error": "not here"})
            msgs = req.get("messages") or []
            prompt = sum(len(str(m.get("content", "")).split()) + 4 for m in msgs)
            reply_room = (req.get("options") or {}).get("num_predict") or 0
            summarizer = msgs and "summar" in str(msgs[0].get("content", "")).lower() and len(msgs) == 2
            with fake.lock:
                if summarizer:
                    fake.summarizer_calls += 1
                else:
                    fake.chats.append(raw)
            if prompt + reply_room > num_ctx:
                return self.answer(500, {"error": f"prompt of {prompt} tokens + {reply_room} "
                                                  f"exceeds num_ctx {num_ctx}"})
            text = words(min(reply_room or 12, 40), 3) if summarizer else "fine"
            return self.answer(200, {
                "model": model, "created_at": "2026-12-06T00:00:00Z",
                "message": {"role": "assistant", "content": text}, "done": True,
                "done_reason": "stop", "prompt_eval_count": prompt, "eval_count": len(text.split())})

    return H


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def post(port, path, body, timeout=30):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = json.dumps(body).encode() if not isinstance(body, bytes) else body
    c.request("POST", path, data, {"content-type": "application/json"})
    r = c.getresponse()
    out = r.status, dict((k.lower(), v) for k, v in r.getheaders()), r.read()
    c.close()
    return out


def get(port, path):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", path)
    r = c.getresponse()
    out = r.read()
    c.close()
    return json.loads(out)


def check(ok, what):
    print(("ok    " if ok else "FAIL  ") + what)
    if not ok:
        sys.exit(1)


def start(binary, fake, extra):
    fake_port, proxy_port, admin_port = free_port(), free_port(), free_port()
    server = ThreadingHTTPServer(("127.0.0.1", fake_port), handler_for(fake))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    tmp = tempfile.mkdtemp(prefix="fit-check-")
    cfg = os.path.join(tmp, "config.toml")
    with open(cfg, "w") as f:
        f.write(f'[admin]\nlisten = "127.0.0.1:{admin_port}"\n'
                f'[compaction]\ncache_dir = "{tmp}"\n{extra}\n'
                f'[[providers]]\nname = "ollama"\nkind = "ollama"\n'
                f'listen = "127.0.0.1:{proxy_port}"\nupstream = "http://127.0.0.1:{fake_port}"\n'
                f'poll_interval = "200ms"\n')
    log = open(os.path.join(tmp, "proxy.log"), "w")
    proc = subprocess.Popen([binary, "serve", "--config", cfg], stdout=log, stderr=log)
    for _ in range(100):
        try:
            get(admin_port, "/status")
            break
        except OSError:
            time.sleep(0.1)
    return proc, server, proxy_port, admin_port, tmp


def small_window(binary):
    print("== window 512")
    fake = Fake(default_ctx=512)
    proc, server, port, admin, tmp = start(binary, fake, "")
    try:
        system = {"role": "system", "content": words(24, 1)}
        msgs = [system]
        for i in range(39):
            msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": words(25, i)})
        question = {"role": "user", "content": "and what did the seven green birds sing then"}
        msgs.append(question)
        check(len(msgs) == 41, "41 messages, %d words" % sum(len(m["content"].split()) for m in msgs))
        body = {"model": "small", "messages": msgs, "stream": False}
        status, headers, out = post(port, "/api/chat", body)
        check(status == 200, f"summarized, not refused: {status} {out[:200]!r}")
        check("x-llm-warden-compacted" in headers, "header " + headers.get("x-llm-warden-compacted", "-"))
        sent = json.loads(fake.chats[-1])
        sent_raw = fake.chats[-1].decode()
        check(json.dumps(system) in sent_raw and json.dumps(question) in sent_raw,
              "the system message and the last question arrive byte for byte")
        check(sent["messages"][0] == system and sent["messages"][-1] == question,
              "system first and the last question last, unchanged")
        prompt = sum(len(str(m["content"]).split()) + 4 for m in sent["messages"])
        check(prompt <= 512, f"fits the window: {prompt} of 512 by the fake's count")
        calls = fake.summarizer_calls
        check(calls >= 1, f"summarizer called {calls} time(s)")
        status, headers, _ = post(port, "/api/chat", body)
        events = get(admin, "/status")["compaction"]["events"]
        check(status == 200 and fake.summarizer_calls == calls and events[-1].get("source") == "cache",
              f"the identical resend is a cache hit: {status}, {fake.summarizer_calls - calls} new "
              f"summarizer call(s), source {events[-1].get('source')!r}")
        msgs2 = msgs + [{"role": "assistant", "content": "fine"},
                        {"role": "user", "content": "and the red kites"}]
        status, headers, out = post(port, "/api/chat", {"model": "small", "messages": msgs2, "stream": False})
        events = get(admin, "/status")["compaction"]["events"]
        check(status == 200, f"next turn served: {status} {out[:120]!r}")
        check("cache" in (events[-1].get("source") or ""),
              f"the next turn reuses the summary: source {events[-1].get('source')!r}, "
              f"{fake.summarizer_calls - calls} new summarizer call(s)")
    finally:
        proc.terminate()
        proc.wait()
        server.shutdown()


def critical(binary):
    print("== critical pressure")
    fake = Fake(default_ctx=4096)
    extra = ("[buffers.context]\ninitial = 1024\n"
             "[memory_pressure]\nwarning = 0.01\ncritical = 0.02\nhysteresis = 0.005\naction = \"compress\"\n"
             'sample_interval = "100ms"\ngpu = false\n')
    proc, server, port, admin, tmp = start(binary, fake, extra)
    try:
        for _ in range(50):
            if get(admin, "/status")["system"]["pressure_level"] == "critical":
                break
            time.sleep(0.1)
        check(get(admin, "/status")["system"]["pressure_level"] == "critical", "critical")
        chat = {"model": "small", "stream": False, "options": {"num_predict": 150},
                "messages": [{"role": "user", "content": words(150, 2)}]}
        status, headers, out = post(port, "/api/chat", chat)
        check(status == 200 and headers.get("x-llm-warden-num-ctx") == "default->512",
              f"the 150-word chat is served in 512 (at the usual threshold, not pressure's): "
              f"{status} {headers.get('x-llm-warden-num-ctx')} {out[:100]!r}")
        post(port, "/api/generate", {"model": "small", "keep_alive": 0})
        # 350 words and 150 to reply do not fit 512 at all.
        chat["messages"][0]["content"] = words(350, 2)
        status, headers, out = post(port, "/api/chat", chat)
        check(status == 200, f"the 350-word chat is served: {status} {out[:200]!r}")
        chosen = headers.get("x-llm-warden-context", "")
        check(chosen.startswith("512->"), "x-llm-warden-context: " + chosen)
        check(fake.loads[-1] == ("small:latest", int(chosen.split("->")[1])), f"loaded at it: {fake.loads}")
        status, _, _ = post(port, "/api/chat", {"model": "other", "stream": False,
                                                "messages": [{"role": "user", "content": "hi"}]})
        check(status == 200 and fake.runners.get("other:latest") == 512, "a small chat loads other at 512")
        status, headers, out = post(port, "/api/chat", dict(chat, model="other"))
        check(status == 200 and headers.get("x-llm-warden-context") == chosen,
              f"the large chat reloads other larger: {status} {headers.get('x-llm-warden-context')}")
        check(fake.runners.get("other:latest") == int(chosen.split("->")[1]), f"runners {fake.runners}")
    finally:
        proc.terminate()
        proc.wait()
        server.shutdown()


if __name__ == "__main__":
    binary = sys.argv[1] if len(sys.argv) > 1 else "target/release/llm-warden"
    small_window(binary)
    critical(binary)
    print("all held")
