// LMArena's answer stream, one event per line (as of 2026-11; the site's API is private and
// changes: unknown lines are ignored, not errors). Side A only: this worker asks one model.
//   a0:"text"  ag:"reasoning"  ac:{citation}  a2:[{"type":"image","image":URL}]
//   a3:"error text"  ad:{"finishReason":"stop"}  {"error": ...} (a bare JSON error)
function parseLine(line) {
  const text = line.trim();
  if (!text) return null;
  if (text.startsWith("{")) {
    try {
      const body = JSON.parse(text);
      if (body && body.error) return { type: "error", value: errorText(body.error) };
    } catch (e) { /* not JSON after all */ }
    return null;
  }
  const colon = text.indexOf(":");
  if (colon < 1) return null;
  const tag = text.slice(0, colon);
  let value;
  try {
    value = JSON.parse(text.slice(colon + 1));
  } catch (e) {
    return null;
  }
  switch (tag) {
    case "a0": return typeof value === "string" ? { type: "text", value } : null;
    case "ag": return typeof value === "string" ? { type: "reasoning", value } : null;
    case "ac": return { type: "citation", value };
    case "a2": {
      const urls = (Array.isArray(value) ? value : [])
        .filter((item) => item && item.type === "image" && typeof item.image === "string")
        .map((item) => item.image);
      return urls.length ? { type: "images", value: urls } : null;
    }
    case "a3": return { type: "error", value: errorText(value) };
    case "ad": return { type: "finish", value: (value && value.finishReason) || "stop" };
    default: return null;
  }
}

function errorText(error) {
  if (typeof error === "string") return error;
  if (error && typeof error.message === "string") return error.message;
  return JSON.stringify(error);
}

// Split a growing stream into whole lines; keep the unfinished tail for the next piece.
function lineSplitter(onLine) {
  let tail = "";
  return {
    push(piece) {
      tail += piece;
      const lines = tail.split("\n");
      tail = lines.pop();
      lines.forEach(onLine);
    },
    end() {
      if (tail) onLine(tail);
      tail = "";
    },
  };
}
