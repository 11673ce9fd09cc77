// Streams one chat completion per model with the Vercel AI SDK's streamText and its OpenAI
// provider, and prints, as JSON, what each one showed: [text, finish reason, [error messages]].
// Usage: node ai_sdk_chat.mjs BASE_URL MODEL...
import { streamText } from "ai";
import { createOpenAI } from "@ai-sdk/openai";

const [baseURL, ...models] = process.argv.slice(2);
const provider = createOpenAI({ baseURL, apiKey: "k" });
const seen = {};
for (const model of models) {
  let text = "";
  let finish = null;
  const errors = [];
  try {
    const result = streamText({ model: provider.chat(model), prompt: "hi", onError: () => {} });
    for await (const part of result.fullStream) {
      if (part.type === "text-delta") text += part.text;
      if (part.type === "finish") finish = part.finishReason;
      if (part.type === "error") errors.push(String(part.error?.message ?? part.error));
    }
  } catch (error) {
    errors.push(String(error.message ?? error));
  }
  seen[model] = [text, finish, errors];
}
console.log(JSON.stringify(seen));
