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
