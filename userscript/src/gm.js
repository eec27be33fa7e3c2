// Cross-origin HTTP through the userscript manager (GM_xmlhttpRequest), as promises.
class HttpError extends Error {
  constructor(status, body, headers) {
    super(httpMessage(status, body));
    this.status = status;
    this.body = body;
    this.headers = headers || "";
  }

  retryAfter(fallback) {
    const match = /^retry-after:\s*([\d.]+)/im.exec(this.headers);
    return match ? Math.min(300, Number(match[1])) : fallback;
  }
}

function httpMessage(status, body) {
  try {
    const parsed = JSON.parse(body);
    if (parsed && parsed.error) return `HTTP ${status}: ${errorText(parsed.error)}`;
  } catch (e) { /* not JSON */ }
  return status ? `HTTP ${status}` : "network error";
}

// One request; resolves with the response text, rejects with HttpError. onProgress gets
// the text so far while a streamed answer arrives.
function gmRequest({ method = "GET", url, headers = {}, body, timeout = 60000, onProgress, signal, binary }) {
  return new Promise((resolve, reject) => {
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
    if (signal) signal.addEventListener("abort", () => handle && handle.abort && handle.abort());
  });
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    if (signal) signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); });
  });
}
