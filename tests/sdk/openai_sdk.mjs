// The official OpenAI Node SDK against Switchyard, unchanged: a plain and a streamed chat
// completion. Checks the answer text and the usage the SDK parsed, and that Switchyard
// served them. Exits non-zero, saying why, on the first failure. Run by tests/sdk.rs.
//
// usage: node openai_sdk.mjs BASE_URL API_KEY MODEL BACKEND CHUNKS
//   BASE_URL  Switchyard's OpenAI base URL (http://127.0.0.1:PORT/v1)
//   BACKEND   name of the mock backend expected to answer; its text is
//             "Hello from BACKEND word1 word2 ..." with CHUNKS words (= completion tokens)
//
// The SDK is installed by tests/sdk/setup.sh in tests/sdk/node/node_modules, so it is
// loaded from there rather than by a bare import.
import { createRequire } from "node:module";

const require = createRequire(new URL("./node/package.json", import.meta.url));
const { OpenAI } = require("openai");

function expectedText(backend, chunks) {
  const words = ["Hello", "from", backend];
  for (let i = 1; i <= chunks - 3; i++) words.push(`word${i}`);
  return words.slice(0, chunks).join(" ");
}

function check(ok, what) {
  if (!ok) {
    console.error(`openai_sdk.mjs: FAILED: ${what}`);
    process.exit(1);
  }
}

async function main() {
  const [baseURL, apiKey, model, backend, chunksArg] = process.argv.slice(2);
  const chunks = Number(chunksArg);
  const want = expectedText(backend, chunks);
  const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 30_000 });
  const messages = [{ role: "user", content: "Say hello." }];

  const { data: plain, response } = await client.chat.completions
    .create({ model, messages })
    .withResponse();
  const servedBy = response.headers.get("x-switchyard-backend");
  check(servedBy === backend, `plain: served by ${servedBy}, not ${backend}`);
  const text = plain.choices[0].message.content;
  check(text === want, `plain: content ${JSON.stringify(text)}, expected ${JSON.stringify(want)}`);
  check(plain.usage?.completion_tokens === chunks, `plain: completion_tokens ${plain.usage?.completion_tokens}, expected ${chunks}`);
  check(plain.usage.prompt_tokens > 0, `plain: prompt_tokens ${plain.usage.prompt_tokens}`);

  // Streamed usage comes only when the client asks for it, as with OpenAI itself.
  const stream = await client.chat.completions.create({
    model,
    messages,
    stream: true,
    stream_options: { include_usage: true },
  });
  let streamed = "";
  let usage = null;
  let events = 0;
  for await (const chunk of stream) {
    events++;
    streamed += chunk.choices[0]?.delta?.content ?? "";
    if (chunk.usage) usage = chunk.usage;
  }
  check(events >= chunks, `stream: only ${events} chunks`);
  check(streamed === want, `stream: content ${JSON.stringify(streamed)}, expected ${JSON.stringify(want)}`);
  check(usage !== null, "stream: no usage chunk");
  check(usage.completion_tokens === chunks, `stream: completion_tokens ${usage.completion_tokens}, expected ${chunks}`);
  check(usage.prompt_tokens > 0, `stream: prompt_tokens ${usage.prompt_tokens}`);
  console.log(`openai_sdk.mjs: ok: plain and streamed via ${backend}, ${chunks} completion tokens each`);
}

main().catch((e) => {
  console.error(`openai_sdk.mjs: FAILED: ${e?.stack ?? e}`);
  process.exit(1);
});
