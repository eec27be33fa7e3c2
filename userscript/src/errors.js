// A job failure the gateway can name to the API client (docs/worker-protocol.md, codes).
class WorkerError extends Error {
  constructor(code, message, { retry = false, human = false } = {}) {
    super(message);
    this.code = code;
    this.retry = retry;
    this.human = human; // the site asks for a person: pause until they are done
  }
}

// The job fails with this message rather than waiting for another worker: the caller learns
// at once why, and the person at the tab sees the same words.
function needsHuman(message) {
  return new WorkerError("needs_human", message, { human: true });
}

// Flatten OpenAI messages to one prompt: these sites take a single user turn.
function flattenMessages(messages) {
  const parts = [];
  const images = [];
  messages.forEach((message, i) => {
    const last = i === messages.length - 1;
    let text = "";
    if (typeof message.content === "string") text = message.content;
    else if (Array.isArray(message.content)) {
      for (const part of message.content) {
        if (part.type === "text") text += part.text;
        else if (part.type === "image_url" && last) images.push(part.image_url.url);
      }
    }
    parts.push(last && message.role === "user" ? text : `[${message.role}]\n${text}`);
  });
  return { text: parts.join("\n\n"), images };
}
