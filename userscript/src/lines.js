// Generic helpers for text the workers read: an error's words, and a stream cut into lines.
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
