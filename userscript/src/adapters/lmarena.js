// LMArena: runs a job in the page with the user's own session (targets the site as of
// 2026-11; see docs/userscript.md). Everything specific to the site lives here.
const lmarena = {
  id: "lmarena",
  capacity: 1, // one answer at a time per tab, as a person would

  // The site is arena.ai since 2026-02; lmarena.ai answers 301 there (both are matched).
  matches() {
    return /(^|\.)(lm)?arena\.ai$/.test(location.hostname);
  },

  // The catalogue is `initialModels` in the page's flight data: objects with id, publicName,
  // organization, provider, capabilities (outputCapabilities: text, image, video, web,
  // search) and userSelectable. Offered: what the site's own picker offers (not
  // userSelectable: false), text output as chat models, image output as image models (video,
  // web and search-only models are not chat models). A public name repeats across variants:
  // the first visible one serves it. Parsed again only when the flight data changed.
  catalogue() {
    const payload = flightPayload();
    if (this.cached && this.cached.payload === payload) return this.cached.models;
    const models = new Map();
    for (const entry of flightModels(payload)) {
      if (!entry || typeof entry.id !== "string" || typeof entry.publicName !== "string") continue;
      if (entry.userSelectable === false) continue;
      const output = (entry.capabilities && entry.capabilities.outputCapabilities) || {};
      const model = { id: entry.id, chat: Boolean(output.text), image: Boolean(output.image), search: Boolean(output.search) };
      const name = rscString(entry.publicName);
      if ((model.chat || model.image) && !models.has(name)) models.set(name, model);
    }
    this.cached = { payload, models };
    return models;
  },

  async models() {
    const chat = [], image = [];
    for (const [name, model] of this.catalogue()) {
      if (model.chat) chat.push(name);
      if (model.image) image.push(name);
    }
    return { chat, image };
  },

  async run(job, out, signal) {
    const model = this.catalogue().get(job.model);
    if (!model || !(job.kind === "image" ? model.image : model.chat)) {
      throw new WorkerError("model_not_found", `This tab's arena.ai catalogue has no ${job.kind === "image" ? "image" : "chat"} model '${job.model}'.`);
    }
    const request = job.request;
    const { text, images } = job.kind === "image"
      ? { text: request.prompt, images: [] }
      : flattenMessages(request.messages);
    const body = {
      id: uuid7(),
      mode: "direct",
      modelAId: model.id,
      userMessageId: uuid7(),
      modelAMessageId: uuid7(),
      modelBMessageId: uuid7(),
      userMessage: {
        content: text,
        experimental_attachments: images.map((url, i) => ({ name: `image-${i}`, contentType: mimeOf(url), url })),
        metadata: {},
      },
      modality: job.kind === "image" ? "image" : "chat",
    };
    const response = await fetch("/nextjs-api/stream/create-evaluation", {
      method: "POST", credentials: "include", signal,
      headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    if (!response.ok) throw await refusal(response);
    let finish = "stop";
    let failure = null;
    const citations = [];
    const decoder = new TextDecoder();
    const reader = response.body.getReader();
    const lines = lineSplitter((line) => {
      const event = parseLine(line);
      if (!event || failure) return;
      if (event.type === "text") out.delta({ content: event.value });
      else if (event.type === "reasoning") out.delta({ reasoning_content: event.value });
      else if (event.type === "citation") citations.push(event.value);
      else if (event.type === "images") {
        if (job.kind === "image") out.images(event.value);
        else out.delta({ content: event.value.map((url) => `\n![image](${url})\n`).join("") });
      } else if (event.type === "error") failure = siteError(event.value);
      else if (event.type === "finish") finish = event.value === "length" ? "length" : "stop";
    });
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      lines.push(decoder.decode(value, { stream: true }));
    }
    lines.end();
    if (failure) throw failure;
    const sources = citations.filter((c) => c && c.url).map((c, i) => `[${i + 1}] [${c.title || c.url}](${c.url})`);
    if (sources.length && job.kind !== "image") out.delta({ content: `\n\nSources:\n${sources.join("\n")}` });
    return { reason: finish };
  },
};

// Flatten OpenAI messages to one prompt: the site takes a single user turn.
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

// LMArena's answer stream, one event per line (as of 2026-11; the site's API is private and
// changes: unknown lines are ignored, not errors). Side A only: this worker asks one model.
//   a0:"text"  ag:"reasoning"  ac:{citation}  a2:[{"type":"image","image":URL}]
//   a3:"error text"  ad:{"finishReason":"stop"}  {"error": ...} (a bare JSON error)
function parseLine(line) {
  const text = line.trim();
  if (!text) return null;
  if (text.startsWith("{")) {
    try {
      const body = JSON.parse(text);
      if (body && body.error) return { type: "error", value: errorText(body.error) };
    } catch (e) { /* not JSON after all */ }
    return null;
  }
  const colon = text.indexOf(":");
  if (colon < 1) return null;
  const tag = text.slice(0, colon);
  let value;
  try {
    value = JSON.parse(text.slice(colon + 1));
  } catch (e) {
    return null;
  }
  switch (tag) {
    case "a0": return typeof value === "string" ? { type: "text", value } : null;
    case "ag": return typeof value === "string" ? { type: "reasoning", value } : null;
    case "ac": return { type: "citation", value };
    case "a2": {
      const urls = (Array.isArray(value) ? value : [])
        .filter((item) => item && item.type === "image" && typeof item.image === "string")
        .map((item) => item.image);
      return urls.length ? { type: "images", value: urls } : null;
    }
    case "a3": return { type: "error", value: errorText(value) };
    case "ad": return { type: "finish", value: (value && value.finishReason) || "stop" };
    default: return null;
  }
}

// What a refused request means: a challenge or a lapsed sign-in needs the person at the tab.
async function refusal(response) {
  const text = await response.text();
  if (/<title>\s*Just a moment/i.test(text) || /challenge-platform|cf-chl/i.test(text)) {
    return needsHuman("LMArena shows a security check. Open the tab and complete it yourself, then press Resume.");
  }
  if (response.status === 401 || /session (has )?expired|not (logged|signed) in|unauthori[sz]ed/i.test(text)) {
    return needsHuman("The LMArena session expired. Sign in again in this tab, then press Resume.");
  }
  if (response.status === 429) return new WorkerError("rate_limited", "LMArena is rate limiting this session.");
  return siteError(`HTTP ${response.status}: ${text.slice(0, 200)}`);
}

function siteError(text) {
  if (/content|moderat|policy|flagged/i.test(text)) return new WorkerError("content_filter", `LMArena refused: ${text}`);
  if (/too long|context/i.test(text)) return new WorkerError("context_length_exceeded", `LMArena: ${text}`);
  if (/rate limit|too many/i.test(text)) return new WorkerError("rate_limited", `LMArena: ${text}`);
  return new WorkerError("upstream_error", `LMArena: ${text}`);
}

// The page's flight data, as Next.js streams it into the HTML: <script>self.__next_f.push([1,
// "..."])</script>, each push a JSON array whose string is the next piece of the React Server
// Components payload. Read from the page's scripts as data (the DOM is the same in a
// manager's sandbox; the page's globals may not be) and joined, since a row can span pushes.
const FLIGHT_PUSH = /^\s*(?:\(self\.__next_f\s*=\s*self\.__next_f\s*\|\|\s*\[\]\)|self\.__next_f)\.push\(([\s\S]*)\)\s*;?\s*$/;

function flightPayload() {
  let payload = "";
  for (const script of document.querySelectorAll("script:not([src])")) {
    const match = FLIGHT_PUSH.exec(script.textContent);
    if (!match) continue;
    let push;
    try { push = JSON.parse(match[1]); } catch (e) { continue; }
    if (Array.isArray(push) && push[0] === 1 && typeof push[1] === "string") payload += push[1];
  }
  return payload;
}

// The `initialModels` lists in the payload's rows: `<hex id>:<JSON>` lines, except text rows,
// `<hex id>:T<hex length in UTF-8 bytes>,<text>`, which carry no newline. Rows of other kinds
// (I[...] modules, HL[...] hints) are skipped.
function flightModels(payload) {
  const found = [];
  let at = 0;
  while (at < payload.length) {
    const colon = payload.indexOf(":", at);
    if (colon === -1) break;
    if (payload[colon + 1] === "T") {
      const comma = payload.indexOf(",", colon);
      if (comma === -1) break;
      at = afterBytes(payload, comma + 1, parseInt(payload.slice(colon + 2, comma), 16) || 0);
      continue;
    }
    const end = payload.indexOf("\n", colon) === -1 ? payload.length : payload.indexOf("\n", colon);
    const row = payload.slice(colon + 1, end);
    at = end + 1;
    if (row[0] !== "[" && row[0] !== "{") continue;
    try {
      collectModels(JSON.parse(row), found, 0);
    } catch (e) { /* a row this reader does not know */ }
  }
  return found;
}

function collectModels(value, found, depth) {
  if (!value || typeof value !== "object" || depth > 64) return;
  if (!Array.isArray(value) && Array.isArray(value.initialModels)) found.push(...value.initialModels);
  for (const child of Object.values(value)) collectModels(child, found, depth + 1);
}

// The index in `text` after `bytes` UTF-8 bytes from `start`.
function afterBytes(text, start, bytes) {
  let at = start;
  while (bytes > 0 && at < text.length) {
    const code = text.codePointAt(at);
    bytes -= code < 0x80 ? 1 : code < 0x800 ? 2 : code < 0x10000 ? 3 : 4;
    at += code > 0xffff ? 2 : 1;
  }
  return at;
}

// React's flight encoding doubles a string's leading "$" (a single one marks a reference).
function rscString(text) {
  return text.startsWith("$$") ? text.slice(1) : text;
}

function mimeOf(url) {
  const match = /^data:([^;,]+)/.exec(url);
  return match ? match[1] : "image/png";
}

// UUIDv7 (RFC 9562): 48 bits of milliseconds, then random bits, as the site's ids are.
function uuid7() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  let ms = Date.now();
  for (let i = 5; i >= 0; i--) { bytes[i] = ms % 256; ms = Math.floor(ms / 256); }
  bytes[6] = (bytes[6] & 0x0f) | 0x70;
  bytes[8] = (bytes[8] & 0x3f) | 0x80;
  const hex = [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}
