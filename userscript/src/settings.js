// Settings live in the userscript manager's storage; a download from the dashboard comes
// with the gateway URL and a worker token filled in (PRESET), copied in on first run.
const DEFAULTS = {
  gateway: "", token: "", adapter: "auto", models: "", localUrl: "http://localhost:11434/v1",
  capacity: 0, paused: false, noticeSeen: false,
};

const settings = {
  get(name) {
    return GM_getValue(name, DEFAULTS[name]);
  },
  set(name, value) {
    GM_setValue(name, value);
  },
  seed(preset) {
    for (const [name, value] of Object.entries(preset)) {
      if (value && !this.get(name)) this.set(name, value);
    }
  },
};
