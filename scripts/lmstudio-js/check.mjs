// The official LM Studio TypeScript SDK (@lmstudio/sdk) against an LM Studio server or the
// proxy in front of one: get-or-load, list, a streamed respond with its stats, unload, then an
// embedding on the /embedding socket. An outside check, run by hand (needs Node and npm):
//
//   cd scripts/lmstudio-js && npm install @lmstudio/sdk@1.5.0 && HOST=127.0.0.1:1235 node check.mjs
//
// HOST is host:port (no scheme); MODEL and EMBED name the models (the simulator's by default);
// TOKEN an `sk-lm-<id>:<passkey>` key when the server requires one. Prints one line per check.
// 1.5.0: the newest the registry here resolves (2.0.0 needs a dependency it lacks).
import { LMStudioClient } from "@lmstudio/sdk";
const host = process.env.HOST;
const model = process.env.MODEL ?? "qwen2.5-7b-instruct";
const embedModel = process.env.EMBED ?? "text-embedding-nomic-embed-text-v1.5";
const client = new LMStudioClient({ verboseErrorMessages: false, logger: {info(){}, warn: console.warn, error: console.error, debug(){}}, baseUrl: `ws://${host}`, ...(process.env.TOKEN ? {clientIdentifier: process.env.TOKEN.split(":")[0].replace("sk-lm-",""), clientPasskey: process.env.TOKEN.split(":")[1]} : {}) });
const ok = (c, what) => { if (!c) { console.log("FAIL", what); process.exit(1);} console.log("ok", what); };
const m = await client.llm.model(model);
ok(m.identifier === model, `llm.model -> ${m.identifier}`);
const loaded = await client.llm.listLoaded();
ok(loaded.some(x => x.identifier === model), `listLoaded: ${loaded.map(x => x.identifier)}`);
const pred = m.respond("Say hello.", { maxTokens: 5 });
let n = 0;
for await (const f of pred) { n++; }
const r = await pred.result();
ok(n === r.stats.predictedTokensCount, `respond streamed ${n} fragments, stats ${JSON.stringify(r.stats)}`);
await m.unload();
const after = await client.llm.listLoaded();
ok(!after.some(x => x.identifier === model), "unloaded");
const e = await client.embedding.model(embedModel);
const { embedding } = await e.embed("hello");
ok(embedding.length > 0, `embed: ${embedding.length} floats`);
console.log("js sdk: all checks passed");
process.exit(0);
