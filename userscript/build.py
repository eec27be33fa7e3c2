"""Write userscript/pollgate.user.js from userscript/src (the generic build: no gateway, no token).

    python userscript/build.py

The dashboard serves builds set up for its own URL (and, on request, a new worker token).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from webapp.userscript import build  # noqa: E402

if __name__ == "__main__":
    target = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pollgate.user.js")
    with open(target, "w", encoding="utf-8") as handle:
        handle.write(build())
    print(f"wrote {target}")
