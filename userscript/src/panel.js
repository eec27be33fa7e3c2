// A small panel on the page (in a shadow root, so the site's styles leave it alone) and a
// badge in the tab title, both showing the worker's state.
const STATE_LABELS = {
  setup: "not set up", standby: "standby: another tab serves", connected: "connected", busy: "busy",
  paused: "paused", needs_human: "needs you", error: "error", waiting: "waiting for the gateway",
};

function createPanel(worker) {
  const host = document.createElement("div");
  host.id = "pollgate-panel";
  const root = host.attachShadow({ mode: "open" });
  root.innerHTML = `
    <style>
      .box { position: fixed; right: 12px; bottom: 12px; z-index: 2147483647; font: 13px system-ui, sans-serif;
             background: #fff; color: #111; border: 1px solid #bbb; border-radius: 8px; padding: 8px 10px;
             box-shadow: 0 2px 10px rgba(0,0,0,.15); max-width: 320px; }
      .state { font-weight: 600; } .message { color: #555; margin: 4px 0; white-space: pre-wrap; }
      label { display: block; margin: 4px 0; } input, select { width: 100%; box-sizing: border-box; }
      details summary { cursor: pointer; color: #555; }
    </style>
    <div class="box" part="box">
      <div><span class="state" data-role="state"></span> · Pollgate <button data-role="toggle"></button></div>
      <div class="message" data-role="message"></div>
      <details data-role="details"><summary>Settings</summary>
        <form data-role="form">
          <label>Gateway URL <input name="gateway" placeholder="https://example.com/api"></label>
          <label>Worker token <input name="token" type="password" autocomplete="off" placeholder="pgw_..."></label>
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
  for (const name of ["gateway", "token", "adapter", "models", "localUrl"]) form.elements[name].value = settings.get(name);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    for (const name of ["gateway", "token", "adapter", "models", "localUrl"]) settings.set(name, form.elements[name].value.trim());
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
