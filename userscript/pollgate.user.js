// ==UserScript==
// @name         Pollgate worker
// @namespace    pollgate
// @version      0.1.0
// @description  Serve a Pollgate gateway's jobs from this tab: arena.ai (LMArena) with your own session, or a local OpenAI-compatible server.
// @match        https://arena.ai/*
// @match        https://*.arena.ai/*
// @match        https://lmarena.ai/*
// @match        https://*.lmarena.ai/*
// @grant        GM_getValue
// @grant        GM_setValue
// @grant        GM_xmlhttpRequest
// @connect      *
// @connect      arena.ai
// @connect      lmarena.ai
// @connect      localhost
// @connect      127.0.0.1
// @run-at       document-idle
// @noframes
// ==/UserScript==

(function () {
"use strict";
const PRESET = {"gateway": "", "token": ""};

// Generic helpers for text the workers read: an error's words, and a stream cut into lines.
function errorText(error) {
  if (typeof error === "string") return error;
  if (error && typeof error.message === "string") return error.message;
  return JSON.stringify(error);
}

// Split a growing stream into whole lines; keep the unfinished tail for the next piece.
function lineSplitter(onLine) {
  let tail = "";
  return {
    push(piece) {
      tail += piece;
      const lines = tail.split("\n");
      tail = lines.pop();
      lines.forEach(onLine);
    },
    end() {
      if (tail) onLine(tail);
      tail = "";
    },
  };
}

// Cross-origin HTTP through the userscript manager (GM_xmlhttpRequest), as promises.
class HttpError extends Error {
  constructor(status, body, headers) {
    super(httpMessage(status, body));
    this.status = status;
    this.body = body;
    this.headers = headers || "";
    this.code = errorCode(body); // gateway_busy, upgrade_pending, database_unavailable, ...
  }

  // Retry-After in seconds (a number or an HTTP date), or the fallback.
  retryAfter(fallback) {
    const match = /^retry-after:\s*(.+?)\s*$/im.exec(this.headers);
    if (!match) return fallback;
    const value = match[1];
    const seconds = /^[\d.]+$/.test(value) ? Number(value) : (Date.parse(value) - Date.now()) / 1000;
    return Number.isFinite(seconds) ? Math.min(300, Math.max(0, seconds)) : fallback;
  }
}

function httpMessage(status, body) {
  try {
    const parsed = JSON.parse(body);
    if (parsed && parsed.error) return `HTTP ${status}: ${errorText(parsed.error)}`;
  } catch (e) { /* not JSON */ }
  return status ? `HTTP ${status}` : body || "network error";
}

function errorCode(body) {
  try {
    const code = JSON.parse(body).error.code;
    return typeof code === "string" ? code : "";
  } catch (e) {
    return "";
  }
}

// One request; resolves with the response text, rejects with HttpError. onProgress gets
// the text so far while a streamed answer arrives. `timeout` (ms) bounds the whole request:
// the manager is told, and a timer of our own holds it to that, as not every manager does.
function gmRequest({ method = "GET", url, headers = {}, body, timeout = 60000, onProgress, signal, binary }) {
  return new Promise((resolveOnce, rejectOnce) => {
    let timer = null;
    const resolve = (value) => { clearTimeout(timer); resolveOnce(value); };
    const reject = (error) => { clearTimeout(timer); rejectOnce(error); };
    const handle = GM_xmlhttpRequest({
      method,
      url,
      headers: body === undefined ? headers : { "Content-Type": "application/json", ...headers },
      data: body === undefined ? undefined : JSON.stringify(body),
      timeout,
      responseType: binary ? "arraybuffer" : undefined,
      onprogress: onProgress ? (r) => onProgress(r.responseText || "") : undefined,
      onload: (r) => {
        if (r.status >= 200 && r.status < 300) resolve(binary ? r.response : r.responseText);
        else reject(new HttpError(r.status, binary ? "" : r.responseText, r.responseHeaders));
      },
      onerror: () => reject(new HttpError(0, "", "")),
      ontimeout: () => reject(new HttpError(0, "timed out", "")),
      onabort: () => reject(new DOMException("aborted", "AbortError")),
    });
    const abort = () => handle && handle.abort && handle.abort();
    if (timeout > 0) timer = setTimeout(() => { reject(new HttpError(0, "timed out", "")); abort(); }, timeout);
    if (signal) signal.addEventListener("abort", abort);
  });
}

// Wait `ms`, or until `signal` aborts (at once if it already has: a wake-up that came while the
// caller was busy is not lost).
function sleep(ms, signal) {
  return new Promise((resolve) => {
    if (signal && signal.aborted) return resolve();
    const timer = setTimeout(resolve, ms);
    if (signal) signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); });
  });
}

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

// The worker protocol (docs/worker-protocol.md): claim, report chunks, release, status.

// Every report timing derives from the job's lease: it lapses lease_ttl seconds after the
// gateway last heard about the job (LEASE_TTL in webapp/config.py, 15 s by default, is
// assumed until a claim names one). Counting from the last report that got through:
//   ttl/3     a heartbeat goes out (the protocol asks for one at least this often)
//   2 ttl/3   at the latest, a hung report is abandoned (a report times out after ttl/3)
//   3 ttl/4   at the latest, it is sent again (a retry waits at most ttl/12)
// so the retry still has a quarter of the lease to land. A report takes milliseconds: ttl/3
// (5 s) leaves room for a slow shared host. The floors keep a tiny lease from becoming a
// busy loop, the ceiling a long one from waiting minutes on a dead request. The pollclient
// keeps the same schedule (pollclient/lease.py).
const DEFAULT_LEASE_TTL = 15;

function leaseTimings(ttl = DEFAULT_LEASE_TTL) {
  const report = Math.min(15, Math.max(0.5, ttl / 3));
  return { heartbeatMs: Math.max(0.2, ttl / 3) * 1000, reportMs: report * 1000, retryMs: (report / 4) * 1000 };
}

// The first positive lease_ttl among the sources (the claim answer, then the job), else the fallback.
function leaseTtl(sources, fallback = DEFAULT_LEASE_TTL) {
  for (const source of sources) {
    const value = source && source.lease_ttl;
    if (typeof value === "number" && Number.isFinite(value) && value > 0) return value;
  }
  return fallback;
}

// How long to wait on a 429 or 503: its Retry-After plus up to a fifth more, so that many
// tabs spread out, and at most `cap` seconds (an upgrade can end sooner than it guessed).
const MAX_RETRY_AFTER = 120;

function politeDelay(seconds, cap = MAX_RETRY_AFTER) {
  const delay = Math.max(seconds, 0.5) * (1 + Math.random() / 5);
  return delay <= cap ? delay : cap * (0.8 + Math.random() / 5);
}

const BUSY_REASONS = {
  upgrade_pending: "The gateway is being upgraded",
  database_unavailable: "The gateway's database is unavailable",
  gateway_busy: "The gateway is busy",
};

function busyReason(error) {
  return BUSY_REASONS[error.code] || "The gateway is busy";
}

class Gateway {
  constructor(url, token) {
    this.url = url.replace(/\/+$/, "");
    this.token = token;
  }

  // One call; an answer that is not a JSON object (a host's error page) fails like a network error.
  call(path, body, timeoutMs, options = {}) {
    return gmRequest({
      method: "POST",
      url: `${this.url}/worker/v1/${path}`,
      headers: { Authorization: `Bearer ${this.token}` },
      body,
      timeout: timeoutMs,
      ...options,
    }).then((text) => {
      let answer = null;
      try { answer = JSON.parse(text); } catch (e) { /* said below */ }
      if (!answer || typeof answer !== "object" || Array.isArray(answer)) {
        throw new Error(`The gateway answered ${path} with something that is not JSON (is the gateway URL right?)`);
      }
      return answer;
    });
  }

  // The read waits out the long-poll plus one lease: a later answer would carry jobs whose
  // leases lapsed on the way.
  claim(offer, wait, maxJobs, ttl, signal) {
    return this.call("claim", { ...offer, wait, max_jobs: maxJobs, capacity: offer.capacity },
      (wait + ttl) * 1000, { signal });
  }

  report(entries, ttl) {
    return this.call("chunks", { jobs: entries }, leaseTimings(ttl).reportMs);
  }

  status(status, message) {
    return this.call("status", { status, message: message.slice(0, 255) }, leaseTimings().reportMs);
  }

  release(jobs) {
    const ttl = Math.min(...jobs.map((job) => leaseTtl([job])));
    return this.call("release", { jobs: jobs.map((job) => ({ id: job.id, lease: job.lease })) },
      leaseTimings(ttl).reportMs);
  }
}

// Sends one job's deltas in order, batched: the first at once, the rest every FLUSH_MS,
// an empty report as a heartbeat when the job is quiet, and the finish or error last. A
// report that fails or hangs is sent again soon enough to keep the lease (see above).
const FLUSH_MS = 100;

class Reporter {
  constructor(gateway, job, onStop, onTrouble = () => {}) {
    this.gateway = gateway;
    this.job = job;
    this.onStop = onStop;
    this.onTrouble = onTrouble; // a line for the panel while reports fail, "" once they work again
    this.timings = leaseTimings(job.lease_ttl);
    this.sent = []; // every chunk, so a seq_gap can be answered by resending
    this.acked = 0;
    this.pending = [];
    this.end = null;
    this.busy = null;
    this.stopped = false;
    this.refusal = ""; // what the gateway refused, once it did: said in the panel
    this.failures = 0;
    this.retryAt = 0; // after a failed report, not before this
    this.timer = null;
    this.timerAt = Infinity;
    this.schedule(this.timings.heartbeatMs);
  }

  // Send the next report within `ms` (a sooner one stands), and not before retryAt: a timer
  // set before a report failed is moved back, or it would resend before the backoff.
  schedule(ms) {
    if (this.stopped) return;
    const at = Math.max(Date.now() + ms, this.retryAt);
    if (this.timer !== null && this.timerAt <= at && this.timerAt >= this.retryAt) return;
    clearTimeout(this.timer);
    this.timerAt = at;
    this.timer = setTimeout(() => { this.timer = null; this.flush(); }, at - Date.now());
  }

  delta(delta) {
    if (this.stopped) return;
    this.pending.push(delta);
    this.schedule(this.sent.length ? FLUSH_MS : 0); // the first piece at once: the client's time to first token
  }

  async finish(end) {
    this.end = end;
    while (!this.stopped && this.end) {
      // A report that failed set retryAt, maybe while we slept: the last one waits for it
      // like any other, so look again after every wait.
      const wait = this.retryAt - Date.now();
      if (wait > 0) await sleep(wait);
      else await this.flush();
    }
    this.stop();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    this.timer = null;
  }

  flush() {
    if (this.busy) return this.busy;
    clearTimeout(this.timer);
    this.timer = null;
    this.busy = this._send().finally(() => { this.busy = null; });
    return this.busy;
  }

  async _send() {
    for (const delta of this.pending.splice(0)) this.sent.push({ seq: this.sent.length, delta });
    const entry = { id: this.job.id, lease: this.job.lease, chunks: this.sent.slice(this.acked) };
    const end = this.end;
    if (end && end.finish) entry.finish = end.finish;
    if (end && end.error) entry.error = end.error;
    const sentAt = Date.now();
    try {
      const reply = await this.gateway.report([entry], this.job.lease_ttl);
      if (this.stopped) return; // the job ended meanwhile (handed back, or the tab closes)
      const answer = Array.isArray(reply.jobs) ? reply.jobs[0] : null;
      if (!answer || typeof answer !== "object") throw new Error("the gateway's answer did not mention the job");
      if (Number.isInteger(answer.next_seq)) this.acked = Math.min(Math.max(answer.next_seq, 0), this.sent.length);
      if (answer.stop) {
        this.stop();
        if (answer.reason !== "finished") this.onStop(answer.reason);
        return;
      }
      if (!answer.ok && answer.reason !== "seq_gap") throw new Error(`the gateway did not take the report (${answer.reason})`);
      if (this.failures) this.onTrouble("");
      this.failures = 0;
      this.retryAt = 0;
      if (answer.ok && end) this.end = null; // stored: nothing left to say
      const more = this.pending.length || this.acked < this.sent.length;
      this.schedule(more ? FLUSH_MS : sentAt + this.timings.heartbeatMs - Date.now());
    } catch (error) {
      if (this.stopped) return;
      if (error.status === 400) return this.refused(error);
      if (error.status === 401 || error.status === 413) {
        this.stop(); // nothing in the call was stored and retrying will not change that
        this.onStop(error.message);
        return;
      }
      // A timeout, network trouble or a busy gateway: resend the same chunks soon. A long
      // Retry-After is not waited out, or the lease would lapse meanwhile.
      const cap = this.timings.retryMs / 1000;
      const busy = error.status === 429 || error.status === 503;
      const seconds = busy ? politeDelay(error.retryAfter(cap), cap)
        : Math.min(cap, 0.5 * 2 ** Math.min(this.failures, 10)) * (0.5 + Math.random() / 2);
      this.failures += 1;
      this.retryAt = Date.now() + seconds * 1000;
      const why = busy ? busyReason(error) : `Reports to the gateway fail (${error.message})`;
      this.onTrouble(`${why}; sending the output again in ${seconds.toFixed(1)} s to keep the job.`);
      this.schedule(0);
    }
  }

  // The gateway refused a report (a 400 naming the field): nothing in it was stored and the
  // same report would be refused again. Stop the job and fail it with one error-only report,
  // so its client hears why now rather than when the lease lapses; if that report fails
  // too, the lease lapses as before.
  async refused(error) {
    const detail = error.message.replace(/^HTTP 400: /, ""); // the gateway's words, naming the field
    this.refusal = `The gateway refused this tab's output, so job ${this.job.id} failed: ${detail}`;
    this.stop();
    this.onStop(this.refusal);
    const message = `The worker's output was refused by the gateway: ${detail}`;
    const entry = { id: this.job.id, lease: this.job.lease, error: { code: "invalid_output", message, retry: false } };
    await this.gateway.report([entry], this.job.lease_ttl).catch(() => {});
  }
}

// Settings live in the userscript manager's storage; a download from the dashboard comes
// with the gateway URL and a worker token filled in (PRESET), copied in on first run.
const DEFAULTS = {
  gateway: "", token: "", adapter: "auto", models: "", localUrl: "http://localhost:11434/v1",
  capacity: 0, paused: false, noticeSeen: false,
};

const settings = {
  get(name) {
    return GM_getValue(name, DEFAULTS[name]);
  },
  set(name, value) {
    GM_setValue(name, value);
  },
  seed(preset) {
    for (const [name, value] of Object.entries(preset)) {
      if (value && !this.get(name)) this.set(name, value);
    }
  },
};

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

// A local OpenAI-compatible server the browser can reach (Ollama, llama.cpp, vLLM, LM Studio),
// called through the userscript manager so any browser can be a worker without Python.
const local = {
  id: "local",
  capacity: 2,

  matches() {
    return location.pathname.startsWith("/browser-worker");
  },

  base() {
    return settings.get("localUrl").replace(/\/+$/, "");
  },

  async models() {
    const text = await gmRequest({ url: `${this.base()}/models`, timeout: 10000 });
    const ids = (JSON.parse(text).data || []).map((m) => m.id).filter((id) => typeof id === "string");
    return { chat: ids, image: [] };
  },

  async run(job, out, signal) {
    const body = { ...job.request, stream: true, stream_options: { include_usage: true } };
    let seen = 0, reason = "stop", usage = null, failure = null;
    const callIds = new Map(); // the index given to each tool-call id the server left unindexed
    const lines = lineSplitter((line) => {
      if (!line.startsWith("data:")) return;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      let event;
      try { event = JSON.parse(data); } catch (e) { return; }
      if (event.error) { failure = new WorkerError("upstream_error", `local server: ${errorText(event.error)}`); return; }
      const counts = event.usage ? [event.usage.prompt_tokens, event.usage.completion_tokens] : [];
      if (counts.length && counts.every((n) => Number.isInteger(n) && n >= 0)) { // else the gateway counts
        usage = { prompt_tokens: counts[0], completion_tokens: counts[1] };
      }
      for (const choice of event.choices || []) {
        const delta = {};
        for (const name of ["content", "reasoning_content", "refusal"]) {
          if (choice.delta && typeof choice.delta[name] === "string" && choice.delta[name]) delta[name] = choice.delta[name];
        }
        const calls = cleanToolCalls(choice.delta && choice.delta.tool_calls, callIds);
        if (calls.length) delta.tool_calls = calls;
        if (Object.keys(delta).length) out.delta(delta);
        if (choice.finish_reason) reason = choice.finish_reason === "function_call" ? "tool_calls" : choice.finish_reason;
      }
    });
    try {
      await gmRequest({
        method: "POST", url: `${this.base()}/chat/completions`, body, signal, timeout: job.deadline_in * 1000,
        onProgress: (text) => { lines.push(text.slice(seen)); seen = text.length; },
      }).then((text) => { lines.push(text.slice(seen)); lines.end(); });
    } catch (error) {
      if (error.name === "AbortError") throw error;
      if (error.status === 404) throw new WorkerError("model_not_found", `The local server has no model '${job.model}'.`);
      if (error.status === 429) throw new WorkerError("rate_limited", "The local server is busy.");
      throw new WorkerError("upstream_unavailable", `The local server at ${this.base()} failed: ${error.message}`,
                            { retry: !error.status });
    }
    if (failure) throw failure;
    // The gateway knows OpenAI's reasons only; a server's own (TGI's "eos_token") is a stop.
    return { reason: ["stop", "length", "tool_calls", "content_filter"].includes(reason) ? reason : "stop", usage };
  },
};

// Rebuild a server's tool-call pieces in the protocol's strict shape (docs/worker-protocol.md),
// without unknown keys or nulls, as pollclient/backends.py `clean_tool_calls` does.
function cleanToolCalls(items, callIds) {
  const calls = [];
  (Array.isArray(items) ? items : []).forEach((item, position) => {
    if (!item || typeof item !== "object" || Array.isArray(item)) return;
    const id = typeof item.id === "string" ? item.id : "";
    let index = item.index;
    if (!Number.isInteger(index) || index < 0 || index > 127) {
      // Gemini's compatibility API leaves the index out, and streams parallel calls in
      // separate chunks: number calls by id; a piece without one continues the latest.
      if (id && !callIds.has(id)) callIds.set(id, callIds.size);
      index = id ? callIds.get(id) : Math.max(callIds.size - 1, position);
    }
    const call = id ? { index, id, type: "function" } : { index };
    const source = item.function && typeof item.function === "object" ? item.function : {};
    const fn = typeof source.name === "string" && source.name ? { name: source.name } : {};
    if (source.arguments != null) { // some servers send a JSON value; OpenAI streams its text
      fn.arguments = typeof source.arguments === "string" ? source.arguments : JSON.stringify(source.arguments);
    }
    if (Object.keys(fn).length) call.function = fn;
    if (Object.keys(call).length > 1) calls.push(call); // a bare index tells the client nothing
  });
  return calls;
}

// A small panel on the page and a badge in the tab title, both showing the worker's state.
// The panel lives in a closed shadow root: the site's styles leave it alone, and the site's
// scripts get null from host.shadowRoot; only this closure holds the root. The worker token
// stays in the manager's storage: the form never holds it, only whether one is set and its
// public prefix (what the gateway's dashboard shows), and forgets what was typed once saved.
const STATE_LABELS = {
  setup: "not set up", standby: "standby: another tab serves", connected: "connected", busy: "busy",
  paused: "paused", needs_human: "needs you", error: "error", waiting: "waiting for the gateway",
};

const FIELDS = ["gateway", "adapter", "models", "localUrl"];
const TOKEN_PREFIX = 12; // the gateway shows a token's first 12 characters ("pgw_" and 8 more)

function tokenLabel(token) {
  const prefix = /^pgw_/.test(token) && token.length > TOKEN_PREFIX * 2 ? ` (${token.slice(0, TOKEN_PREFIX)}…)` : "";
  return `token set${prefix}`;
}

function createPanel(worker) {
  const host = document.createElement("div");
  host.id = "pollgate-panel";
  const root = host.attachShadow({ mode: "closed" });
  root.innerHTML = `
    <style>
      .box { position: fixed; right: 12px; bottom: 12px; z-index: 2147483647; font: 13px system-ui, sans-serif;
             background: #fff; color: #111; border: 1px solid #bbb; border-radius: 8px; padding: 8px 10px;
             box-shadow: 0 2px 10px rgba(0,0,0,.15); max-width: 320px; }
      .state { font-weight: 600; } .message { color: #555; margin: 4px 0; white-space: pre-wrap; }
      .notice { background: #fff8e1; border-radius: 4px; padding: 4px 6px; margin: 4px 0; }
      label { display: block; margin: 4px 0; } input, select { width: 100%; box-sizing: border-box; }
      details summary { cursor: pointer; color: #555; } [hidden] { display: none !important; }
    </style>
    <div class="box" part="box">
      <div><span class="state" data-role="state"></span> · Pollgate <button data-role="toggle"></button></div>
      <div class="message" data-role="message"></div>
      <div class="notice" data-role="notice"><span data-role="notice-text"></span>
        <button type="button" data-role="notice-ok">Got it</button></div>
      <details data-role="details"><summary>Settings</summary>
        <form data-role="form">
          <label>Gateway URL <input name="gateway" placeholder="https://example.com/api"></label>
          <div data-role="token-set">Worker token: <span data-role="token-label"></span>
            <button type="button" data-role="replace">Replace token</button></div>
          <label data-role="token-entry">Worker token <input name="token" type="password" autocomplete="off"
            placeholder="pgw_..."></label>
          <label>Site adapter <select name="adapter"><option value="auto">auto</option>
            <option value="lmarena">LMArena</option><option value="local">local endpoint</option></select></label>
          <label>Serve only these models (comma-separated; empty: all) <input name="models"></label>
          <label>Local endpoint <input name="localUrl"></label>
          <button type="submit">Save</button>
        </form>
      </details>
    </div>`;
  const $ = (role) => root.querySelector(`[data-role=${role}]`);
  const form = $("form");
  const showToken = (replacing = false) => {
    const token = settings.get("token");
    $("token-label").textContent = token ? tokenLabel(token) : "";
    $("token-set").hidden = !token || replacing;
    $("token-entry").hidden = Boolean(token) && !replacing;
  };
  for (const name of FIELDS) form.elements[name].value = settings.get(name);
  showToken();
  // What the person should know before the first job (the arena.ai history), until they say so.
  const adapter = worker.adapter();
  $("notice-text").textContent = (adapter && adapter.notice) || "";
  $("notice").hidden = !(adapter && adapter.notice) || Boolean(settings.get("noticeSeen"));
  $("notice-ok").addEventListener("click", () => {
    settings.set("noticeSeen", true);
    $("notice").hidden = true;
  });
  $("replace").addEventListener("click", () => {
    showToken(true);
    form.elements.token.focus();
  });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    for (const name of FIELDS) settings.set(name, form.elements[name].value.trim());
    const token = form.elements.token.value.trim();
    form.elements.token.value = ""; // kept in the manager's storage only, never in the page
    if (token) settings.set("token", token);
    showToken();
    worker.restart();
  });
  $("toggle").addEventListener("click", () => (worker.paused ? worker.resume() : worker.pause("Paused from the panel.")));
  document.body.appendChild(host);
  const title = document.title.replace(/^\[Pollgate: [^\]]*\] /, "");
  return {
    show(state, message) {
      $("state").textContent = STATE_LABELS[state] || state;
      $("message").textContent = message || "";
      $("toggle").textContent = worker.paused ? "Resume" : "Pause";
      host.dataset.state = state;
      document.title = `[Pollgate: ${STATE_LABELS[state] || state}] ${title}`;
      if (state === "setup") $("details").open = true;
    },
  };
}

// The worker: one long-poll per site (tabs take turns through a Web Lock), jobs run by the
// site's adapter, output batched back, a pause for the person whenever the site asks for one.
const VERSION = "0.1.0";
const ADAPTERS = [lmarena, local];
const POLL_WAIT = 20; // seconds a claim waits for a job: under nginx's 60 s idle cut-off
const STATUS_EVERY = 30000; // a paused worker says so this often, so it stays listed

class BrowserWorker {
  constructor() {
    this.paused = Boolean(settings.get("paused"));
    this.closing = false; // the page is being hidden for good (pagehide)
    this.human = "";
    this.running = new Map();
    this.wake = new AbortController();
    this.failures = 0;
    this.leaseTtl = DEFAULT_LEASE_TTL; // the latest lease a claim answer named
  }

  adapter() {
    const choice = settings.get("adapter");
    return ADAPTERS.find((a) => (choice === "auto" ? a.matches() : a.id === choice)) || null;
  }

  gateway() {
    const url = settings.get("gateway"), token = settings.get("token");
    return url && token ? new Gateway(url, token) : null;
  }

  start() {
    this.panel = createPanel(this);
    this.show("standby");
    addEventListener("pagehide", () => this.handBack());
    // Back from the back/forward cache: the page lives again, and so does its worker.
    addEventListener("pageshow", (event) => {
      if (event.persisted && this.closing) {
        this.closing = false;
        this.restart();
      }
    });
    // Tabs of one site share the token's single long-poll: one holds the lock and polls;
    // the others wait and take over when it closes.
    if (navigator.locks) navigator.locks.request("pollgate-worker", () => this.run());
    else this.run();
  }

  show(state, message) {
    this.state = state;
    this.panel.show(state, message);
  }

  restart() {
    this.wake.abort(); // ends the current wait or claim; the loop starts over with new settings
  }

  pause(message, human = false) {
    this.paused = true;
    this.human = human ? message : "";
    settings.set("paused", true);
    const gateway = this.gateway();
    if (gateway) gateway.status(human ? "needs_human" : "paused", message).catch(() => {});
    this.show(human ? "needs_human" : "paused", message);
    this.restart();
  }

  resume() {
    this.paused = false;
    this.human = "";
    settings.set("paused", false);
    this.restart();
  }

  async run() {
    for (;;) {
      if (this.wake.signal.aborted) this.wake = new AbortController();
      const signal = this.wake.signal;
      if (this.closing) {
        await sleep(3600000, signal); // the page is going: a claim now would take jobs nobody runs
        continue;
      }
      const gateway = this.gateway(), adapter = this.adapter();
      if (!gateway || !adapter) {
        this.show("setup", !adapter ? "No adapter for this page: pick one in Settings."
          : "Paste the gateway URL and a worker token (dashboard > My workers) in Settings.");
        await sleep(3600000, signal);
        continue;
      }
      if (this.paused) {
        const message = this.human || "Paused: press Resume to serve again.";
        this.show(this.human ? "needs_human" : "paused", message);
        await gateway.status(this.human ? "needs_human" : "paused", message).catch(() => {});
        await sleep(STATUS_EVERY, signal);
        continue;
      }
      const capacity = Number(settings.get("capacity")) || adapter.capacity;
      if (this.running.size >= capacity) {
        await sleep(3600000, signal); // a finished job wakes us
        continue;
      }
      await this.claimOnce(gateway, adapter, capacity, signal);
    }
  }

  async claimOnce(gateway, adapter, capacity, signal) {
    try {
      const offer = await this.offer(adapter, capacity);
      if (!offer.models.length && !offer.image_models.length) {
        this.show("error", "The site offers none of the models you chose to serve.");
        await sleep(STATUS_EVERY, signal);
        return;
      }
      this.claiming = true;
      const answer = await gateway.claim(offer, POLL_WAIT, capacity - this.running.size, this.leaseTtl, signal)
        .finally(() => { this.claiming = false; });
      if (!Array.isArray(answer.jobs)) throw new Error("The gateway's claim answer has no job list");
      this.failures = 0;
      this.leaseTtl = leaseTtl([answer, answer.jobs[0]], this.leaseTtl);
      if (answer.superseded) {
        this.show("error", "Another tab or program is using this worker token; give each its own token.");
        await sleep(10000, signal);
        return;
      }
      for (const job of answer.jobs) {
        job.lease_ttl = leaseTtl([answer, job]); // the answer's own lease speaks for all its jobs
        this.runJob(gateway, adapter, job);
      }
      this.show(this.running.size ? "busy" : "connected", `${adapter.id} adapter on ${location.host}`);
    } catch (error) {
      if (signal.aborted) return;
      if (error.status === 401) {
        this.show("error", "The gateway refused the worker token: paste a valid one in Settings.");
        await sleep(3600000, signal);
      } else if (error.status === 429 || error.status === 503) {
        const seconds = politeDelay(error.retryAfter(10));
        this.show("waiting", `${busyReason(error)}; trying again in ${Math.round(seconds)} s, as it asked.`);
        await sleep(seconds * 1000, signal);
      } else {
        // Equal jitter: never under half the delay, so many tabs spread out.
        const delay = Math.min(30, 2 ** this.failures++);
        this.show("error", `${error.message}; retrying in ${Math.round(delay)} s.`);
        await sleep((delay / 2 + Math.random() * delay / 2) * 1000, signal);
      }
    }
  }

  async offer(adapter, capacity) {
    const wanted = settings.get("models").split(",").map((m) => m.trim()).filter(Boolean);
    const keep = (ids) => (wanted.length ? ids.filter((id) => wanted.includes(id)) : ids).slice(0, 64);
    const models = await adapter.models();
    return {
      models: keep(models.chat), image_models: keep(models.image), capacity,
      kind: `userscript/${adapter.id}`, version: VERSION, site: location.host,
    };
  }

  async runJob(gateway, adapter, job) {
    const controller = new AbortController();
    const answering = `Answering with ${job.model}.`;
    const reporter = new Reporter(gateway, job, () => controller.abort(),
      (trouble) => { if (!this.paused) this.show("busy", trouble ? `${answering} ${trouble}` : answering); });
    this.running.set(job.id, { job, controller });
    this.show("busy", answering);
    const images = [];
    const out = { delta: (delta) => reporter.delta(delta), images: (urls) => images.push(...urls) };
    try {
      const result = await adapter.run(job, out, controller.signal);
      if (job.kind === "image") {
        if (!images.length) throw new WorkerError("upstream_error", "The site answered without an image.");
        for (const url of images.slice(0, job.request.n || 1)) {
          reporter.delta({ images: [await imageFor(url, job.request.response_format)] });
        }
      }
      const finish = { reason: result.reason || "stop" };
      if (result.usage) finish.usage = result.usage;
      await reporter.finish({ finish });
    } catch (error) {
      if (!controller.signal.aborted) {
        const failure = error instanceof WorkerError ? error : new WorkerError("upstream_error", String(error.message || error));
        if (failure.human) this.pause(failure.message, true); // before the report: not one more claim
        await reporter.finish({ error: { code: failure.code, message: failure.message, retry: failure.retry } });
      }
    } finally {
      reporter.stop();
      this.running.delete(job.id);
      if (!this.paused) {
        // What the gateway refused stays in the panel until the next claim answers.
        if (reporter.refusal) this.show("error", reporter.refusal);
        else this.show(this.running.size ? "busy" : "connected");
      }
      // A slot is free: wake a loop that waits for one (a claim in flight comes back by itself).
      if (!this.claiming) this.restart();
    }
  }

  handBack() {
    // The tab is closing: give unfinished jobs back so another worker can take them, and
    // claim no more. A claim sent after the release would take the released job straight
    // back for this dying page, and it would sit until its lease lapsed.
    this.closing = true;
    this.restart();
    const gateway = this.gateway();
    const jobs = [...this.running.values()];
    if (gateway && jobs.length) gateway.release(jobs.map((entry) => entry.job)).catch(() => {});
    jobs.forEach((entry) => entry.controller.abort());
  }
}

// An image as the client asked for it: a URL, or the bytes in base64.
async function imageFor(url, format) {
  if (format !== "b64_json") return { url };
  if (url.startsWith("data:")) return { b64_json: url.slice(url.indexOf(",") + 1) };
  const bytes = new Uint8Array(await gmRequest({ url, binary: true }));
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return { b64_json: btoa(binary) };
}

settings.seed(PRESET);
new BrowserWorker().start();
})();
