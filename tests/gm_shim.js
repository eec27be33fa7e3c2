// The userscript manager's API for tests: an expression, called with the seed settings, that
// returns GM_getValue, GM_setValue and GM_xmlhttpRequest for the script's own scope (never
// the page's window, as a manager does). With `persist`, storage lives in the page's
// localStorage, so a reload or a second tab sees it; without, in this closure only, out of
// the page's reach like a manager's storage. Requests go through the page's fetch as it
// was before the page's scripts ran; Chromium runs with web security off, standing in for
// the manager's own cross-origin requests. `connect` is the script's @connect list: as in
// Tampermonkey, a request to a host it does not cover (a domain covers its subdomains; `*`
// only lets the manager ask) would wait on a prompt to the person, so here it fails at once.
((seed, { persist = true, connect } = {}) => {
  const KEY = "__pollgate_gm__";
  const fetch = window.fetch.bind(window);
  const store = (persist && JSON.parse(localStorage.getItem(KEY) || "null")) || { ...seed };
  const save = () => persist && localStorage.setItem(KEY, JSON.stringify(store));
  save();
  const GM_getValue = (name, fallback) => (name in store ? store[name] : fallback);
  const GM_setValue = (name, value) => { store[name] = value; save(); };
  const declared = (url) => {
    const host = new URL(url, location.href).hostname;
    return connect.some((entry) => entry === "self" ? host === location.hostname
      : entry !== "*" && (host === entry || host.endsWith(`.${entry}`)));
  };
  const GM_xmlhttpRequest = (details) => {
    const controller = new AbortController();
    if (connect && !declared(details.url)) {
      const error = `${new URL(details.url, location.href).hostname} is not part of the @connect list`;
      setTimeout(() => details.onerror && details.onerror({ error }), 0);
      return { abort: () => {} };
    }
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
  return { GM_getValue, GM_setValue, GM_xmlhttpRequest };
})
