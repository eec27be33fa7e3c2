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
    const lines = lineSplitter((line) => {
      if (!line.startsWith("data:")) return;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      let event;
      try { event = JSON.parse(data); } catch (e) { return; }
      if (event.error) { failure = new WorkerError("upstream_error", `local server: ${errorText(event.error)}`); return; }
      if (event.usage) usage = { prompt_tokens: event.usage.prompt_tokens, completion_tokens: event.usage.completion_tokens };
      for (const choice of event.choices || []) {
        const delta = {};
        for (const name of ["content", "reasoning_content", "refusal", "tool_calls"]) {
          if (choice.delta && choice.delta[name]) delta[name] = choice.delta[name];
        }
        if (Object.keys(delta).length) out.delta(delta);
        if (choice.finish_reason) reason = choice.finish_reason;
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
    return { reason, usage };
  },
};
