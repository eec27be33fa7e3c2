// The worker protocol (docs/worker-protocol.md): claim, report chunks, release, status.
class Gateway {
  constructor(url, token) {
    this.url = url.replace(/\/+$/, "");
    this.token = token;
  }

  call(path, body, options = {}) {
    return gmRequest({
      method: "POST",
      url: `${this.url}/worker/v1/${path}`,
      headers: { Authorization: `Bearer ${this.token}` },
      body,
      ...options,
    }).then((text) => JSON.parse(text));
  }

  claim(offer, wait, maxJobs, signal) {
    return this.call("claim", { ...offer, wait, max_jobs: maxJobs, capacity: offer.capacity }, {
      timeout: (wait + 30) * 1000, signal,
    });
  }

  status(status, message) {
    return this.call("status", { status, message: message.slice(0, 255) });
  }

  release(jobs) {
    return this.call("release", { jobs: jobs.map((job) => ({ id: job.id, lease: job.lease })) });
  }
}

// Sends one job's deltas in order, batched: the first at once, the rest every FLUSH_MS,
// an empty report as a heartbeat when the job is quiet, and the finish or error last.
const FLUSH_MS = 100;

class Reporter {
  constructor(gateway, job, onStop) {
    this.gateway = gateway;
    this.job = job;
    this.onStop = onStop;
    this.sent = []; // every chunk, so a seq_gap can be answered by resending
    this.acked = 0;
    this.pending = [];
    this.end = null;
    this.timer = null;
    this.busy = null;
    this.stopped = false;
    this.lastReport = Date.now();
    this.heartbeat = setInterval(() => {
      if (Date.now() - this.lastReport > (job.lease_ttl * 1000) / 3) this.flush();
    }, 1000);
  }

  delta(delta) {
    if (this.stopped) return;
    this.pending.push(delta);
    if (this.sent.length === 0 && this.acked === 0 && !this.busy) this.flush();
    else if (!this.timer) this.timer = setTimeout(() => this.flush(), FLUSH_MS);
  }

  async finish(end) {
    this.end = end;
    clearInterval(this.heartbeat);
    while (!this.stopped) {
      await this.flush();
      if (this.stopped || (this.end === null)) break;
      await sleep(1000); // the last report failed; keep the lease by trying again
    }
  }

  async flush() {
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
    try {
      const answer = (await this.gateway.call("chunks", { jobs: [entry] })).jobs[0];
      this.lastReport = Date.now();
      this.acked = Math.min(answer.next_seq, this.sent.length);
      if (answer.stop) {
        this.stopped = true;
        clearInterval(this.heartbeat);
        if (answer.reason !== "finished") this.onStop(answer.reason);
      } else if (end) {
        this.end = null; // stored: nothing left to say
      }
    } catch (error) {
      if (error.status === 400 || error.status === 401 || error.status === 413) {
        this.stopped = true; // nothing in the call was stored and retrying will not change that
        clearInterval(this.heartbeat);
        this.onStop(error.message);
      }
      // Network trouble or a busy gateway: the next flush resends the same chunks.
    }
  }
}
