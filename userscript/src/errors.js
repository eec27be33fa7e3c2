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
