"""Secrets kept in files of the instance folder, made once and agreed on by every process."""
from __future__ import annotations

import contextlib
import os
import secrets


def shared_secret(path: str, value: str) -> str:
    """Return the secret in path, first writing value there (0600) if none; every process gets the same one."""
    with contextlib.suppress(FileNotFoundError), open(path) as handle:
        return handle.read().strip()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temp = f"{path}.{secrets.token_hex(8)}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(value + "\n")
        # Publish the whole file at once: a link fails if another process got there first,
        # and a reader never sees a created but still empty file.
        with contextlib.suppress(FileExistsError):
            os.link(temp, path)
    finally:
        os.remove(temp)
    with open(path) as handle:
        return handle.read().strip()
