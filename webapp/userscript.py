"""Build the browser worker's .user.js from userscript/src, optionally set up for one gateway and token."""
from __future__ import annotations

import json
import os
from urllib.parse import urlsplit

VERSION = "0.1.0"
SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "userscript", "src")
# Order matters: each file uses only what the ones before it define.
SOURCES = ("lines.js", "gm.js", "errors.js", "protocol.js", "settings.js", "adapters/lmarena.js",
           "adapters/local.js", "panel.js", "main.js")


def _read(name: str) -> str:
    with open(os.path.join(SRC, name), encoding="utf-8") as handle:
        return handle.read()


def build(gateway: str = "", token: str = "") -> str:
    """Return the whole userscript; with a gateway it may talk only to that host (and the site's, and
    localhost: header.js), with a token it starts set up."""
    gateway = gateway.rstrip("/")
    host = urlsplit(gateway).hostname if gateway else ""
    header = (_read("header.js")
              .replace("{{VERSION}}", VERSION)
              # The local-endpoint adapter runs on the gateway's own /browser-worker page.
              .replace("{{GATEWAY_MATCH}}", f"// @match        {gateway}/browser-worker*\n" if gateway else "")
              # The manager asks before a script reaches a host it did not declare; a generic
              # build cannot know the gateway, so it declares any host. header.js adds the
              # site's own domains (subdomains included: its images) and localhost.
              .replace("{{CONNECT}}", f"// @connect      {host}\n" if host else "// @connect      *\n")
              .replace("{{UPDATE}}", f"// @updateURL    {gateway}/userscript/pollgate.user.js\n"
                                     f"// @downloadURL  {gateway}/userscript/pollgate.user.js\n" if gateway else ""))
    preset = json.dumps({"gateway": gateway, "token": token})
    body = "\n".join(_read(name) for name in SOURCES).replace("{{VERSION}}", VERSION)
    return f'{header}\n(function () {{\n"use strict";\nconst PRESET = {preset};\n\n{body}}})();\n'
