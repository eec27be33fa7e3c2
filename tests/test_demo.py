"""The README's first command: the demo serves a streamed completion end to end."""
from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT


def test_demo_streams_a_completion_through_the_echo_worker(tmp_path):
    env = {**os.environ, "POLLGATE_INSTANCE_PATH": str(tmp_path / "instance")}
    env.pop("DATABASE_URL", None)
    flask = [sys.executable, "-m", "flask", "--app", "webapp", "demo", "--port", "0", "--once"]
    done = subprocess.run(flask, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "streamed through the gateway: 'Hello from Pollgate: this answer streamed through the queue.'" in done.stdout
    assert (tmp_path / "instance" / "pollgate.db").exists()
    # A second run reuses the database and the demo user.
    again = subprocess.run(flask, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "created user" not in again.stdout
