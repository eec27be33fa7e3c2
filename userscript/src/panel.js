// A small panel on the page and a badge in the tab title, both showing the worker's state.
// The panel lives in a closed shadow root: the site's styles leave it alone, and the site's
// scripts get null from host.shadowRoot; only this closure holds the root. The worker token
// stays in the manager's storage: the form never holds it, only whether one is set and its
// public prefix (what the gateway's dashboard shows), and forgets what was typed once saved.
const STATE_LABELS = {
  setup: "not set up", standby: "standby: another tab serves", connected: "connected", busy: "busy",
  paused: "paused", needs_human: "needs you", error: "error", waiting: "waiting for the gateway",
};

const FIELDS = ["gateway", "adapter", "models", "localUrl"];
const TOKEN_PREFIX = 12; // the gateway shows a token's first 12 characters ("pgw_" and 8 more)

function tokenLabel(token) {
  const prefix = /^pgw_/.test(token) && token.length > TOKEN_PREFIX * 2 ? ` (${token.slice(0, TOKEN_PREFIX)}…)` : "";
  return `token set${prefix}`;
}

function createPanel(worker) {
  const host = document.createElement("div");
  host.id = "pollgate-panel";
  const root = host.attachShadow({ mode: "closed" });
  root.innerHTML = `
    <style>
      .box { position: fixed; right: 12px; bottom: 12px; z-index: 2147483647; font: 13px system-ui, sans-serif;
             background: #fff; color: #111; border: 1px solid #bbb; border-radius: 8px; padding: 8px 10px;
             box-shadow: 0 2px 10px rgba(0,0,0,.15); max-width: 320px; }
      .state { font-weight: 600; } .message { color: #555; margin: 4px 0; white-space: pre-wrap; }
      .notice { background: #fff8e1; border-radius: 4px; padding: 4px 6px; margin: 4px 0; }
      label { display: block; margin: 4px 0; } input, select { width: 100%; box-sizing: border-box; }
      details summary { cursor: pointer; color: #555; } [hidden] { display: none !important; }
    </style>
    <div class="box" part="box">
      <div><span class="state" data-role="state"></span> · Pollgate <button data-role="toggle"></button></div>
      <div class="message" data-role="message"></div>
      <div class="notice" data-role="notice"><span data-role="notice-text"></span>
        <button type="button" data-role="notice-ok">Got it</button></div>
      <details data-role="details"><summary>Settings</summary>
        <form data-role="form">
          <label>Gateway URL <input name="gateway" placeholder="https://example.com/api"></label>
          <div data-role="token-set">Worker token: <span data-role="token-label"></span>
            <button type="button" data-role="replace">Replace token</button></div>
          <label data-role="token-entry">Worker token <input name="token" type="password" autocomplete="off"
            placeholder="pgw_..."></label>
          <label>Site adapter <select name="adapter"><option value="auto">auto</option>
            <option value="lmarena">LMArena</option><option value="local">local endpoint</option></select></label>
          <label>Serve only these models (comma-separated; empty: all) <input name="models"></label>
          <label>Local endpoint <input name="localUrl"></label>
          <button type="submit">Save</button>
        </form>
      </details>
    </div>`;
  const $ = (role) => root.querySelector(`[data-role=${role}]`);
  const form = $("form");
  const showToken = (replacing = false) => {
    const token = settings.get("token");
    $("token-label").textContent = token ? tokenLabel(token) : "";
    $("token-set").hidden = !token || replacing;
    $("token-entry").hidden = Boolean(token) && !replacing;
  };
  for (const name of FIELDS) form.elements[name].value = settings.get(name);
  showToken();
  // What the person should know before the first job (the arena.ai history), until they say so.
  const adapter = worker.adapter();
  $("notice-text").textContent = (adapter && adapter.notice) || "";
  $("notice").hidden = !(adapter && adapter.notice) || Boolean(settings.get("noticeSeen"));
  $("notice-ok").addEventListener("click", () => {
    settings.set("noticeSeen", true);
    $("notice").hidden = true;
  });
  $("replace").addEventListener("click", () => {
    showToken(true);
    form.elements.token.focus();
  });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    for (const name of FIELDS) settings.set(name, form.elements[name].value.trim());
    const token = form.elements.token.value.trim();
    form.elements.token.value = ""; // kept in the manager's storage only, never in the page
    if (token) settings.set("token", token);
    showToken();
    worker.restart();
  });
  $("toggle").addEventListener("click", () => (worker.paused ? worker.resume() : worker.pause("Paused from the panel.")));
  document.body.appendChild(host);
  const title = document.title.replace(/^\[Pollgate: [^\]]*\] /, "");
  return {
    show(state, message) {
      $("state").textContent = STATE_LABELS[state] || state;
      $("message").textContent = message || "";
      $("toggle").textContent = worker.paused ? "Resume" : "Pause";
      host.dataset.state = state;
      document.title = `[Pollgate: ${STATE_LABELS[state] || state}] ${title}`;
      if (state === "setup") $("details").open = true;
    },
  };
}
