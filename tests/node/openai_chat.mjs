// Streams one chat completion per model with the openai Node SDK and prints, as JSON, what
// each one showed: [text, last finish reason], or "ErrorClass(code)". Usage:
//   node openai_chat.mjs BASE_URL MODEL...
import OpenAI from "openai";

const [baseURL, ...models] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: "k", maxRetries: 0, timeout: 20000 });
const seen = {};
for (const model of models) {
  let text = "";
  let reason = null;
  try {
    const stream = await client.chat.completions.create({
      model,
      messages: [{ role: "user", content: "hi" }],
      stream: true,
    });
    for await (const chunk of stream) {
      for (const choice of chunk.choices) {
        text += choice.delta?.content ?? "";
        reason = choice.finish_reason ?? reason;
      }
    }
    seen[model] = [text, reason];
  } catch (error) {
    const kind = error instanceof OpenAI.APIError ? "APIError" : error.constructor.name;
    seen[model] = error.code ? `${kind}(${error.code})` : kind;
  }
}
console.log(JSON.stringify(seen));
