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
