"""The official `lmstudio` Python SDK against an LM Studio server (the simulator, or the proxy
in front of it): connect, list loaded models, load, a streamed `respond` with its stats,
unload, and check that the REST API sees the SDK's loads.

Run by cli/tests/it/python_clients.rs. Environment:
  WARDEN_LMS_HOST   host:port of the server (the SDK's `api_host`; no scheme)
  WARDEN_LMS_TOKEN  when set, the server requires this API token (`sk-lm-<id>:<passkey>`):
                    the script connects with it and checks that a client without one is refused
  WARDEN_LMS_MODEL  the model key to load (default qwen2.5-7b-instruct)
  WARDEN_LMS_MODE   `full` (default: everything above); `stream`: get or load the model and
                    stream one prediction of at most WARDEN_LMS_TOKENS (default 20) fragments, left
                    loaded; `drop`: the same, but the process exits after two fragments,
                    dropping its socket mid-prediction; `load` / `unload`: get or load the model, or
                    unload it; `embed`: get or load WARDEN_LMS_EMBED (default
                    text-embedding-nomic-embed-text-v1.5) on `/embedding` and embed two texts

Prints one line per check and "lmstudio_sdk: N checks passed" at the end; exits non-zero on
the first failure.
"""

import json
import os
import sys
import urllib.request

import lmstudio as lms

HOST = os.environ["WARDEN_LMS_HOST"]
TOKEN = os.environ.get("WARDEN_LMS_TOKEN") or None
MODEL = os.environ.get("WARDEN_LMS_MODEL", "qwen2.5-7b-instruct")

checks = 0


def check(cond, what):
    global checks
    if not cond:
        print(f"FAIL: {what}", flush=True)
        sys.exit(1)
    checks += 1
    print(f"ok: {what}", flush=True)


def rest(path):
    req = urllib.request.Request(f"http://{HOST}{path}")
    if TOKEN:
        req.add_header("Authorization", f"Bearer {TOKEN}")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


# The SDK takes no token from the environment in this run unless we pass it.
os.environ.pop("LMSTUDIO_API_TOKEN", None)

check(lms.Client.is_valid_api_host(HOST), f"{HOST} answers the greeting probe")

MODE = os.environ.get("WARDEN_LMS_MODE", "full")
if MODE == "load":
    with lms.Client(HOST, api_token=TOKEN) as client:
        check(client.llm.model(MODEL).identifier == MODEL, "got or loaded through the SDK")
    print(f"lmstudio_sdk: {checks} checks passed", flush=True)
    sys.exit(0)
if MODE == "unload":
    with lms.Client(HOST, api_token=TOKEN) as client:
        client.llm.model(MODEL).unload()
        check(client.llm.list_loaded() == [], "unloaded through the SDK")
    print(f"lmstudio_sdk: {checks} checks passed", flush=True)
    sys.exit(0)
if MODE == "embed":
    embed_model = os.environ.get("WARDEN_LMS_EMBED", "text-embedding-nomic-embed-text-v1.5")
    with lms.Client(HOST, api_token=TOKEN) as client:
        model = client.embedding.model(embed_model)
        check(model.identifier == embed_model, "got or loaded the embedding model")
        for text in ("hello", "a second text"):
            vector = model.embed(text)
            check(
                len(vector) > 0 and all(isinstance(x, float) for x in vector),
                f"embed({text!r}): {len(vector)} floats",
            )
    print(f"lmstudio_sdk: {checks} checks passed", flush=True)
    sys.exit(0)
if MODE in ("stream", "drop"):
    n = int(os.environ.get("WARDEN_LMS_TOKENS", "20"))
    with lms.Client(HOST, api_token=TOKEN) as client:
        model = client.llm.model(MODEL)
        stream = model.respond_stream("Count slowly.", config={"maxTokens": n})
        got = 0
        for fragment in stream:
            got += 1
            if MODE == "drop" and got == 2:
                check(True, "two fragments in: dropping the socket mid-prediction")
                print(f"lmstudio_sdk: {checks} checks passed", flush=True)
                os._exit(0)
        stats = stream.result().stats
        check(got == stats.predicted_tokens_count, f"respond_stream streamed {got} fragments")
        stop = stats.stop_reason
        check(stop in ("maxPredictedTokensReached", "eosFound"), f"the prediction ended: {stop}")
    print(f"lmstudio_sdk: {checks} checks passed", flush=True)
    sys.exit(0)

if TOKEN:
    refused = None
    try:
        with lms.Client(HOST) as anonymous:
            anonymous.llm.list_loaded()
    except Exception as e:  # the SDK's error type for a failed auth varies by version
        refused = e
    check(refused is not None, f"a client without the token is refused ({refused!r})")

with lms.Client(HOST, api_token=TOKEN) as client:
    before = client.llm.list_loaded()
    check(
        all(m.identifier != MODEL for m in before),
        f"list_loaded before the load: {[m.identifier for m in before]}",
    )

    model = client.llm.load_new_instance(MODEL)
    check(model.identifier == MODEL, f"load_new_instance -> {model.identifier}")
    loaded = [m.identifier for m in client.llm.list_loaded()]
    check(MODEL in loaded, f"list_loaded after the load: {loaded}")

    v0 = {m["id"]: m for m in rest("/api/v0/models")["data"]}
    check(v0[MODEL]["state"] == "loaded", "the REST API v0 sees the SDK's load")
    v1 = {m["key"]: m for m in rest("/api/v1/models")["models"]}
    instances = [i["id"] for i in v1[MODEL]["loaded_instances"]]
    check(MODEL in instances, f"the REST API v1 sees the instance: {instances}")

    info = model.get_info()
    check(info.model_key == MODEL, f"get_info: {info.model_key}, ctx {info.context_length}")

    fragments = []
    stream = model.respond_stream("Say hello in three words.", config={"maxTokens": 5})
    for fragment in stream:
        fragments.append(fragment.content)
    result = stream.result()
    check(len(fragments) == 5, f"respond_stream streamed {len(fragments)} fragments")
    check(result.content == "".join(fragments), "the result is the streamed text")
    stats = result.stats
    check(
        stats.prompt_tokens_count and stats.prompt_tokens_count > 0,
        f"stats.prompt_tokens_count = {stats.prompt_tokens_count}",
    )
    check(stats.predicted_tokens_count == 5, f"stats.predicted_tokens_count = 5")
    check(
        stats.total_tokens_count
        == stats.prompt_tokens_count + stats.predicted_tokens_count,
        "stats.total_tokens_count = prompt + predicted",
    )
    check(
        stats.stop_reason == "maxPredictedTokensReached",
        f"stats.stop_reason = {stats.stop_reason}",
    )
    check(result.model_info.model_key == MODEL, "the result names the model")

    whole = model.respond("Another question?")
    check(whole.stats.stop_reason == "eosFound", f"respond: {whole.content!r}")

    model.unload()
    after = [m.identifier for m in client.llm.list_loaded()]
    check(MODEL not in after, f"list_loaded after unload: {after}")
    v0 = {m["id"]: m for m in rest("/api/v0/models")["data"]}
    check(v0[MODEL]["state"] == "not-loaded", "the REST API v0 sees the unload")

    # llm.model(key) gets or loads (the `getOrLoad` channel: a just-in-time load).
    jit = client.llm.model(MODEL)
    check(jit.identifier == MODEL, f"llm.model loads {jit.identifier}")
    again = client.llm.model(MODEL)
    check(again.identifier == MODEL, "llm.model again finds it loaded")
    jit.unload()
    check(client.llm.list_loaded() == [], "nothing loaded at the end")

print(f"lmstudio_sdk: {checks} checks passed", flush=True)
