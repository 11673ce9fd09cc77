// Reads a UI message stream as useChat does (the `ai` package's chat transport and message
// reader) and prints what the user would see, as JSON. Usage: node ui_chat.mjs URL
import { DefaultChatTransport, readUIMessageStream } from "ai";

const url = process.argv[2];
const transport = new DefaultChatTransport({ api: url });
const chunks = [];
const errors = [];
let last;
try {
  const stream = await transport.sendMessages({
    chatId: "chat-1",
    messages: [{ id: "m-1", role: "user", parts: [{ type: "text", text: "hi" }] }],
    abortSignal: undefined,
    trigger: "submit-message",
    messageId: undefined,
  });
  const seen = stream.pipeThrough(
    new TransformStream({
      transform(chunk, controller) {
        chunks.push(chunk);
        controller.enqueue(chunk);
      },
    }),
  );
  for await (const message of readUIMessageStream({ stream: seen, onError: (e) => errors.push(String(e.message ?? e)) })) {
    last = message;
  }
} catch (error) {
  errors.push(String(error.message ?? error));
}
const parts = last ? last.parts : [];
const join = (type) => parts.filter((p) => p.type === type).map((p) => p.text).join("");
const finish = chunks.find((chunk) => chunk.type === "finish");
console.log(
  JSON.stringify({
    text: join("text"),
    reasoning: join("reasoning"),
    finishReason: finish ? finish.finishReason ?? null : null,
    errors,
    types: chunks.map((chunk) => chunk.type),
  }),
);
