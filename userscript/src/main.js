// The worker: one long-poll per site (tabs take turns through a Web Lock), jobs run by the
// site's adapter, output batched back, a pause for the person whenever the site asks for one.
const VERSION = "{{VERSION}}";
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
