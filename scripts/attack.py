#!/usr/bin/env python3
"""Hostile and sloppy input against a running release binary (issue 18), from outside.

Starts `llm-warden simulate ollama` and `simulate lmstudio`, then `llm-warden serve` in front
of them, all on free loopback ports, and sends each case over a raw socket: request
smuggling shapes, bodies read two ways, model names as weapons, admin API abuse from a
"browser", slow bodies, codings, a flood of invented names (RSS before and after). Prints
one line per case and exits non-zero if any case fails.

    cargo build --release && python3 scripts/attack.py [target/release/llm-warden]

Standard library only. The same cases, in Rust, run in `cargo test`
(cli/tests/it/hostile.rs) against the debug binary.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

BIN = sys.argv[1] if len(sys.argv) > 1 else "target/release/llm-warden"
CHAT = b'{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":false}'
results = []


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, limit=30):
    end = time.time() + limit
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def exchange(port, raw, timeout=20):
    """Sends raw bytes, reads until the server closes; the whole reply as text."""
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(timeout)
    try:
        s.sendall(raw)
    except OSError:
        pass
    out = b""
    try:
        while True:
            b = s.recv(65536)
            if not b:
                break
            out += b
    except OSError:
        pass
    s.close()
    return out.decode("utf-8", "replace")


def post(path, body, headers="", host="localhost"):
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
        f"Connection: close\r\n{headers}\r\n"
    ).encode() + body


def status(reply):
    try:
        return int(reply.split(" ", 2)[1])
    except (IndexError, ValueError):
        return 0


def body_json(reply):
    try:
        return json.loads(reply.split("\r\n\r\n", 1)[1])
    except (IndexError, ValueError):
        return None


def check(name, ok, detail=""):
    results.append(ok)
    print(f"{'ok  ' if ok else 'FAIL'} {name}" + (f"  [{detail}]" if not ok and detail else ""))


def admin_get(admin, path):
    r = exchange(admin, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    return body_json(r)


def model_total(admin, model):
    s = admin_get(admin, "/status") or {}
    for m in s.get("models", []):
        if m.get("provider") == "ollama" and m.get("model") == model:
            return m.get("total_requests", 0)
    return 0


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main():
    ports = {k: free_port() for k in ["sim_o", "sim_l", "admin", "ollama", "lmstudio"]}
    procs = []
    tmp = tempfile.mkdtemp(prefix="llm-warden-attack-")
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(subprocess.Popen([BIN, "simulate", "ollama", "--listen", f"127.0.0.1:{ports['sim_o']}",
                                   "--token-delay", "10ms", "--reply-tokens", "40"], **quiet))
    procs.append(subprocess.Popen([BIN, "simulate", "lmstudio", "--listen", f"127.0.0.1:{ports['sim_l']}"], **quiet))
    config = os.path.join(tmp, "config.toml")
    with open(config, "w") as f:
        f.write(
            f'[admin]\nlisten = "127.0.0.1:{ports["admin"]}"\n'
            f'[proxy]\nbody_read_timeout = "2s"\nheader_read_timeout = "2s"\n'
            f'[compaction]\ncache_dir = "{tmp}"\n'
            f'[[providers]]\nname = "ollama"\nkind = "ollama"\nlisten = "127.0.0.1:{ports["ollama"]}"\n'
            f'upstream = "http://127.0.0.1:{ports["sim_o"]}"\n'
            f'[[providers]]\nname = "lmstudio"\nkind = "lmstudio"\nlisten = "127.0.0.1:{ports["lmstudio"]}"\n'
            f'upstream = "http://127.0.0.1:{ports["sim_l"]}"\n'
        )
    env = dict(os.environ, RUST_LOG="warn")
    env.pop("LLM_WARDEN_ADMIN_TOKEN", None)
    log = open(os.path.join(tmp, "proxy.log"), "wb")
    proxy = subprocess.Popen([BIN, "serve", "--config", config], stdout=log, stderr=log, env=env)
    procs.append(proxy)
    try:
        for k in ports:
            wait_port(ports[k])
        run(ports, proxy, os.path.join(tmp, "proxy.log"))
    finally:
        for p in procs:
            p.kill()
            p.wait()
    failed = results.count(False)
    print(f"\n{len(results) - failed}/{len(results)} cases held")
    sys.exit(1 if failed else 0)


def run(ports, proxy, log_path):
    o, admin, lm = ports["ollama"], ports["admin"], ports["lmstudio"]
    model = "llama3.2:latest"

    # --- bodies read as the provider reads them ---
    n = model_total(admin, model)
    for name, body in [
        ("duplicate model, last wins", b'{"model":"nope","model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":false}'),
        ("Go folds key case: Model", b'{"Model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":false}'),
        ("Go folds U+017F: \u017ftream", '{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"\u017ftream":false}'.encode()),
        ("stream twice", b'{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":true,"stream":false}'),
        ("model name case: LLAMA3.2", b'{"model":"LLAMA3.2","messages":[{"role":"user","content":"hi"}],"stream":false}'),
        ("trailing bytes after the object", CHAT + b" {} garbage"),
        ("model then null (Go keeps the string)", b'{"model":"llama3.2","model":null,"messages":[{"role":"user","content":"hi"}],"stream":false}'),
    ]:
        r = exchange(o, post("/api/chat", body))
        n += 1
        check(f"counted: {name}", status(r) == 200 and model_total(admin, model) == n, r[:80])
    r = exchange(o, post("/api/%63hat", CHAT))
    n += 1
    check("counted: percent-escaped path /api/%63hat", status(r) == 200 and model_total(admin, model) == n, r[:80])
    r = exchange(o, post("/api%2Fchat", CHAT))
    n += 1
    check("counted: /api%2Fchat", status(r) == 200 and model_total(admin, model) == n, r[:80])

    # A duplicated-stream stream is leased: unload through the admin API waits for it.
    body = b'{"model":"llama3.2","messages":[{"role":"user","content":"tell a long story"}],"stream":false,"stream":true}'
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", exchange(o, post("/api/chat", body))))
    t.start()
    end = time.time() + 10
    while time.time() < end:
        s = admin_get(admin, "/status") or {}
        if any(m.get("model") == model and m.get("active_requests") == 1 for m in s.get("models", [])):
            break
        time.sleep(0.01)
    u = exchange(admin, b"POST /models/ollama/llama3.2/unload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    t.join()
    check("stream with stream twice ends whole under an admin unload",
          '"done":true' in box.get("r", "") and status(u) == 200, box.get("r", "")[-120:])

    for name, body, headers, want in [
        ("model 5 -> 400", b'{"model":5}', "", 400),
        ("invalid UTF-8 -> 400", b'{"model":"llama3.2","x":"\xff"}', "", 400),
        ("lone surrogate in model -> 400", b'{"model":"llama3.2\\ud800"}', "", 400),
        ("Content-Encoding gzip -> 415", CHAT, "Content-Encoding: gzip\r\n", 415),
    ]:
        for path, shape in [("/api/chat", "ollama"), ("/v1/chat/completions", "openai")]:
            r = exchange(o, post(path, body, headers))
            j = body_json(r) or {}
            err = j.get("error")
            shaped = isinstance(err, str) if shape == "ollama" else isinstance(err, dict) and "message" in err
            check(f"{name} on {path} ({shape} shape)", status(r) == want and shaped, r[:160])

    # --- browsers and DNS rebinding ---
    exchange(admin, b"POST /models/ollama/llama3.2/load HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    for name, head in [
        ("cross-site form post", "Origin: http://evil.example\r\nContent-Type: application/x-www-form-urlencoded\r\n"),
        ("no-cors fetch from another origin", "Origin: http://evil.example\r\n"),
        ("Sec-Fetch-Site: cross-site", "Sec-Fetch-Site: cross-site\r\n"),
        ("same site, other port", "Origin: http://127.0.0.1:3000\r\n"),
        ("text/plain body", "Content-Type: text/plain\r\n"),
        ("Origin: null (sandboxed frame)", "Origin: null\r\n"),
    ]:
        r = exchange(admin, f"POST /models/ollama/llama3.2/unload HTTP/1.1\r\nHost: 127.0.0.1:{admin}\r\n{head}Content-Length: 0\r\nConnection: close\r\n\r\n".encode())
        check(f"admin refuses {name}", status(r) == 403, r[:100])
    for name, host in [("rebind name", "rebind.evil.example"), ("localhost.evil", "localhost.evil.example"), ("empty-ish", "a b")]:
        r = exchange(admin, f"GET /status HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        check(f"admin refuses Host {name}", status(r) in (400, 403), r[:80])
    r = exchange(admin, f"GET /status HTTP/1.1\r\nHost: localhost:{admin}\r\nConnection: close\r\n\r\n".encode())
    check("admin serves Host localhost", status(r) == 200)
    r = exchange(o, b"GET /api/tags HTTP/1.1\r\nHost: rebind.evil.example\r\nConnection: close\r\n\r\n")
    check("ollama listener refuses a rebind Host (bare 403)", r.startswith("HTTP/1.1 403") and r.endswith("\r\n\r\n"), r[:80])
    r = exchange(o, post("/api/chat", CHAT, host="rebind.evil.example"))
    check("ollama listener refuses a rebound chat", status(r) == 403)
    r = exchange(o, b"GET /api/tags HTTP/1.1\r\nHost: localhost\r\nOrigin: http://evil.example\r\nConnection: close\r\n\r\n")
    check("Origin forwarded: Ollama's own CORS refusal", status(r) == 403)

    # --- framing, codings, slow bodies ---
    r = exchange(o, b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n")
    check("TE gzip, chunked -> 501", status(r) == 501, r[:60])
    r = exchange(o, b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n")
    check("TE chunked, chunked -> 400", status(r) == 400, r[:60])
    r = exchange(o, b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n")
    check("TE and CL together -> 400", status(r) == 400, r[:60])
    r = exchange(o, b"POST /api/show HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\n{\"mod\r\nzz\r\n")
    j = body_json(r) or {}
    check("malformed chunk on pass-through -> 400 Ollama shape", status(r) == 400 and isinstance(j.get("error"), str), r[:120])
    for path in ["/api/chat", "/v1/chat/completions", "/api/show"]:
        s = socket.create_connection(("127.0.0.1", o))
        s.settimeout(30)
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n{{".encode())
        began = time.time()
        stop = threading.Event()

        def drip(sock=s):
            while not stop.is_set():
                time.sleep(0.5)
                try:
                    sock.sendall(b" ")
                except OSError:
                    return
        threading.Thread(target=drip, daemon=True).start()
        out = b""
        try:
            while True:
                b = s.recv(65536)
                if not b:
                    break
                out += b
        except OSError:
            pass
        stop.set()
        s.close()
        took = time.time() - began
        text = out.decode("utf-8", "replace")
        check(f"trickled body on {path} -> 408 after ~2 s ({took:.1f} s)", status(text) == 408 and took < 6, text[:100])

    # Over-window chat with a null entry: forwarded unchanged (never compacted into a yes).
    filler = "the quick brown fox jumps over the lazy dog " * 60
    good = [{"role": "user" if i % 2 == 0 else "assistant", "content": filler} for i in range(15)]
    chat = lambda m: post("/api/chat", json.dumps({"model": "llama3.2", "messages": m, "stream": False}).encode())
    r = exchange(o, chat(good))
    check("control: the same over-window chat without it is compacted", "x-llm-warden-compacted" in r.lower(), r[:300])
    r = exchange(o, chat(good[:1] + [None] + good[1:]))
    check("over-window chat with a null entry is not compacted", "x-llm-warden-compacted" not in r.lower(), r[:200])

    # --- log injection ---
    exchange(admin, b"POST /models/ollama/evil%0d%0aERROR%20forged/load HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    exchange(o, post("/api/chat", b'{"model":"x\\r\\nERROR forged line\\u001b[31m","messages":[{"role":"user","content":"hi"}]}'))
    time.sleep(0.3)
    with open(log_path, "rb") as f:
        logged = f.read()
    forged = [l for l in logged.split(b"\n") if l.startswith(b"ERROR forged")]
    check("no forged log line, no raw ESC", not forged and b"\x1b[31m" not in logged)

    # --- invented names: bounded /status and memory ---
    before = rss_kb(proxy.pid)
    name = "x" * 8000
    for i in range(10000):
        body = json.dumps({"model": f"{name}{i}", "messages": [{"role": "user", "content": "hi"}], "stream": False}).encode()
        exchange(o, post("/api/chat", body))
    after = rss_kb(proxy.pid)
    raw = exchange(admin, b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    size = len(raw)
    check(f"10,000 invented 8 KB names: RSS {before/1024:.1f} -> {after/1024:.1f} MB, /status {size} B",
          after - before < 16 * 1024 and size < 64 * 1024)

    # Nothing left in flight.
    s = admin_get(admin, "/status") or {}
    active = sum(m.get("active_requests", 0) for m in s.get("models", []))
    check("nothing in flight at the end", active == 0, str(active))
    r = exchange(o, post("/api/chat", CHAT))
    check("a normal chat still works", status(r) == 200)


if __name__ == "__main__":
    main()
