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
