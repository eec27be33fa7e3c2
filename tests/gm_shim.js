// The userscript manager's API for tests, in the page: storage in localStorage (seeded once
// from window.__PG_SEED__), GM_xmlhttpRequest on fetch. Chromium runs with web security
// off, standing in for the manager's own cross-origin requests.
(() => {
  const KEY = "__pollgate_gm__";
  const store = JSON.parse(localStorage.getItem(KEY) || "null") || { ...(window.__PG_SEED__ || {}) };
  const save = () => localStorage.setItem(KEY, JSON.stringify(store));
  save();
  window.GM_getValue = (name, fallback) => (name in store ? store[name] : fallback);
  window.GM_setValue = (name, value) => { store[name] = value; save(); };
  window.GM_xmlhttpRequest = (details) => {
    const controller = new AbortController();
    (async () => {
      try {
        const response = await fetch(details.url, {
          method: details.method || "GET", headers: details.headers, body: details.data,
          signal: controller.signal, keepalive: /\/release$/.test(details.url),
        });
        const responseHeaders = [...response.headers].map(([k, v]) => `${k}: ${v}`).join("\r\n");
        if (details.responseType === "arraybuffer") {
          const buffer = await response.arrayBuffer();
          details.onload && details.onload({ status: response.status, response: buffer, responseHeaders });
          return;
        }
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        let text = "";
        for (;;) {
          const { done, value } = await reader.read();
          if (done) break;
          text += decoder.decode(value, { stream: true });
          details.onprogress && details.onprogress({ responseText: text });
        }
        details.onload && details.onload({ status: response.status, responseText: text, responseHeaders });
      } catch (error) {
        if (error.name === "AbortError") details.onabort && details.onabort();
        else details.onerror && details.onerror({ error: String(error) });
      }
    })();
    return { abort: () => controller.abort() };
  };
})();
