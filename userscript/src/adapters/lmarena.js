// arena.ai (LMArena): runs a job in the page with the user's own session (targets the site as
// of 2026-11; the facts and their sources are in docs/userscript.md). Everything specific to
// the site lives here.
const lmarena = {
  id: "lmarena",
  capacity: 1, // one answer at a time per tab, as a person would
  notice: "Each job this tab serves starts a conversation in your arena.ai history, as if you had typed the "
    + "prompt there yourself; the site keeps it like any other.",

  // The site is arena.ai since 2026-02; lmarena.ai answers 301 there (both are matched).
  matches() {
    return /(^|\.)(lm)?arena\.ai$/.test(location.hostname);
  },

  // The catalogue is `initialModels` in the page's flight data: objects with id, publicName,
  // organization, provider, capabilities (outputCapabilities: text, image, video, web,
  // search) and userSelectable. Offered: what the site's own picker offers (not
  // userSelectable: false), text output as chat models, image output as image models (video,
  // web and search-only models are not chat models; a chat model with search output is asked
  // in the search modality). A public name repeats across variants: the first visible one
  // serves it. Parsed again only when the flight data changed.
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
    const content = job.kind === "image" ? job.request.prompt : flattenMessages(job.request.messages);
    const modality = job.kind === "image" ? "image" : model.search ? "search" : "chat";
    const response = await this.evaluate(model, content, modality, signal);
    return readAnswer(response, job, out);
  },

  // One create-evaluation, as the site's own page sends it. Its UI sends mode "direct-battle"
  // since mid-2026 and "direct" before: a 4xx that names the mode means the older site, and
  // the tab keeps to "direct" from then on. The site also wants a recaptchaV3Token; Pollgate
  // never makes one (docs/userscript.md), so a site that insists on it gets none and says so.
  async evaluate(model, content, modality, signal) {
    for (;;) {
      const mode = this.mode || "direct-battle";
      const body = {
        id: uuid7(), mode, modelAId: model.id, userMessageId: uuid7(), modelAMessageId: uuid7(),
        userMessage: { content, experimental_attachments: [], metadata: {} }, modality,
      };
      const response = await fetch("/nextjs-api/stream/create-evaluation", {
        method: "POST", credentials: "include", signal,
        headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      });
      if (response.ok) return response;
      const text = await response.text();
      if (mode !== "direct" && namesTheMode(response.status, text)) {
        this.mode = "direct";
        continue;
      }
      throw refusal(response.status, text);
    }
  },
};

// Flatten OpenAI messages to one prompt: the site takes a single user turn. Images are refused:
// the site takes them only through its own upload flow, which this adapter does not do.
function flattenMessages(messages) {
  const parts = messages.map((message, i) => {
    let text = "";
    if (typeof message.content === "string") text = message.content;
    else if (Array.isArray(message.content)) {
      for (const part of message.content) {
        if (part.type === "text") text += part.text;
        else if (part.type === "image_url") {
          throw new WorkerError("invalid_request", "The arena.ai worker cannot send images: the site takes them only "
            + "through its own upload flow, which Pollgate does not implement. Send text only, or use another model.");
        }
      }
    }
    return i === messages.length - 1 && message.role === "user" ? text : `[${message.role}]\n${text}`;
  });
  return parts.join("\n\n");
}

// Read the answer stream into the job's output; returns the finish ({reason, usage?}) or throws.
async function readAnswer(response, job, out) {
  const answer = { output: false, reason: "stop", usage: null, failure: null };
  const citations = citationList();
  const lines = lineSplitter((line) => {
    const event = answer.failure ? null : parseLine(line);
    if (!event) return;
    if (event.type === "text") out.delta({ content: event.value });
    else if (event.type === "reasoning") out.delta({ reasoning_content: event.value });
    else if (event.type === "citation") citations.add(event.value);
    else if (event.type === "images") {
      if (job.kind === "image") out.images(event.value);
      else out.delta({ content: event.value.map((url) => `\n![image](${url})\n`).join("") });
    } else if (event.type === "error") answer.failure = siteError(event.value);
    else if (event.type === "finish") Object.assign(answer, finishOf(event.value));
    if (event.type === "text" || event.type === "images") answer.output = true;
  });
  const decoder = new TextDecoder();
  const reader = response.body.getReader();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    lines.push(decoder.decode(value, { stream: true }));
  }
  lines.end();
  if (answer.failure) throw answer.failure;
  if (!answer.output) {
    if (answer.reason === "content_filter") throw new WorkerError("content_filter", "arena.ai withheld the answer (content filter).");
    throw new WorkerError("upstream_error", "arena.ai ended the answer without any text or image.");
  }
  if (citations.length() && job.kind !== "image") out.delta({ content: `\n\nSources:\n${citations.markdown()}` });
  return answer.usage ? { reason: answer.reason, usage: answer.usage } : { reason: answer.reason };
}

// The finish line `ad:{"finishReason", "usage"?}`: the AI SDK's reasons, and its usage counts.
function finishOf(value) {
  const reason = value && value.finishReason;
  if (reason === "error") return { failure: new WorkerError("upstream_error", "arena.ai ended the answer with an error.") };
  const finish = { reason: { length: "length", "content-filter": "content_filter" }[reason] || "stop" };
  const usage = value && value.usage;
  const counts = usage ? [usage.promptTokens ?? usage.prompt_tokens, usage.completionTokens ?? usage.completion_tokens] : [];
  if (counts.length && counts.every((n) => Number.isInteger(n) && n >= 0)) { // else the gateway counts
    finish.usage = { prompt_tokens: counts[0], completion_tokens: counts[1] };
  }
  return finish;
}

// Citations arrive as tool-call deltas, ac:{toolCallId, argsTextDelta}: one call's deltas
// joined are JSON whose `source` is one {title, url} or a list. Listed once each, in order.
function citationList() {
  const pending = new Map();
  const sources = [];
  const keep = (source) => {
    if (source && typeof source.url === "string" && /^https?:\/\//.test(source.url) && !sources.some((s) => s.url === source.url)) {
      sources.push({ title: typeof source.title === "string" ? source.title : "", url: source.url });
    }
  };
  return {
    add(value) {
      if (!value || typeof value.argsTextDelta !== "string") return [].concat(value || []).forEach(keep);
      const id = String(value.toolCallId || "");
      const text = (pending.get(id) || "") + value.argsTextDelta;
      let args;
      try { args = JSON.parse(text); } catch (e) { pending.set(id, text); return; } // more deltas to come
      pending.delete(id);
      [].concat((args && args.source) || []).forEach(keep);
    },
    length: () => sources.length,
    markdown: () => sources.map((s, i) => {
      const title = (s.title || s.url).replace(/[[\]\\]/g, "\\$&");
      const url = s.url.replace(/[()\s]/g, (c) => `%${c.charCodeAt(0).toString(16).padStart(2, "0").toUpperCase()}`);
      return `[${i + 1}] [${title}](${url})`;
    }).join("\n"),
  };
}

// The answer stream, one event per line (AI SDK data-stream parts, side A prefixed "a"; the
// site's API is private and changes: unknown lines are ignored, not errors). Side B's "b"
// lines are ignored: this worker asks one model. A leading "data: " is stripped.
//   a0:"text" (a0:"hasArenaError" is a failure)  ag:"reasoning"  ac:{toolCallId, argsTextDelta}
//   a2:[{"type":"image","image":URL}] or [{"type":"heartbeat"}]  a3:"error"
//   ad:{"finishReason":"stop","usage":{...}}  {"error": ...} (a bare JSON error)
function parseLine(line) {
  let text = line.trim();
  if (text.startsWith("data:")) text = text.slice(5).trim();
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
    case "a0":
      if (value === "hasArenaError") return { type: "error", value: "the site reported an error for this answer (hasArenaError)" };
      return typeof value === "string" ? { type: "text", value } : null;
    case "ag": return typeof value === "string" ? { type: "reasoning", value } : null;
    case "ac": return { type: "citation", value };
    case "a2": {
      const urls = (Array.isArray(value) ? value : [])
        .filter((item) => item && item.type === "image" && typeof item.image === "string")
        .map((item) => item.image);
      return urls.length ? { type: "images", value: urls } : null;
    }
    case "a3": return { type: "error", value: errorText(value) };
    case "ad": return { type: "finish", value: value || {} };
    default: return null;
  }
}

// Whether a refused create-evaluation objects to the mode it was sent (an older site).
function namesTheMode(status, text) {
  return status >= 400 && status < 500 && ![401, 403, 429].includes(status) && /\bmode\b|direct-battle/i.test(text);
}

// What a refused request means. A human check, a sign-in or a challenge needs the person at the
// tab: Pollgate never performs those checks (docs/userscript.md), so the worker pauses.
const HUMAN = {
  recaptcha: "arena.ai asks for a reCAPTCHA human check with each message. Pollgate does not perform human checks, "
    + "so this worker cannot serve arena.ai while the site asks for them. Paused: press Resume to try again.",
  challenge: "arena.ai shows a security check (Cloudflare) that Pollgate does not perform. This worker cannot serve "
    + "arena.ai while it does: reload this tab, complete the check yourself, then press Resume.",
  login: "arena.ai asks you to sign in (LOGIN_GATE). This worker cannot serve arena.ai until you do: sign in "
    + "in this tab yourself, then press Resume.",
  expired: "The arena.ai session expired. Sign in again in this tab yourself, then press Resume.",
};

function refusal(status, text) {
  let body = null;
  try { body = JSON.parse(text); } catch (e) { /* an HTML page */ }
  const said = body && typeof body === "object" ? errorText(body.error || body.message || body.code || "") : "";
  if (/<title>\s*(Just a moment|Attention Required)/i.test(text) || /challenge-platform|cf[-_]chl/i.test(text)) {
    return needsHuman(HUMAN.challenge);
  }
  if (body && body.code === "LOGIN_GATE") return needsHuman(HUMAN.login);
  if (/captcha/i.test(text)) return needsHuman(HUMAN.recaptcha);
  if (status === 401 || /session (has )?expired|not (logged|signed) in|unauthori[sz]ed/i.test(text)) return needsHuman(HUMAN.expired);
  if (status === 429 && /prompt failed/i.test(said)) {
    return new WorkerError("content_filter", 'arena.ai refused this prompt (429 "prompt failed"): the site declines '
      + "this prompt, which is not a rate limit, so it is not retried.");
  }
  if (status === 429) return new WorkerError("rate_limited", "arena.ai is rate limiting this session.");
  return siteError(`HTTP ${status}: ${(said || text).slice(0, 200)}`);
}

function siteError(text) {
  if (/content|moderat|policy|flagged/i.test(text)) return new WorkerError("content_filter", `arena.ai refused: ${text}`);
  if (/too long|context/i.test(text)) return new WorkerError("context_length_exceeded", `arena.ai: ${text}`);
  if (/rate limit|too many/i.test(text)) return new WorkerError("rate_limited", `arena.ai: ${text}`);
  return new WorkerError("upstream_error", `arena.ai: ${text}`);
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
