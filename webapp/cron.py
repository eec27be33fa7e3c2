"""Entry point for the cron scripts: run one housekeeping task under its lock, briefly."""
from __future__ import annotations

import logging
import sys
import time

from . import create_app, migrate
from .db import is_unavailable
from .maintenance import TASKS, cron_lock


def run_from_cron(name: str) -> int:
    """Run one task for a cron script: exit at once if a previous run still holds its lock."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        app = create_app()
    except Exception as err:  # a broken config must say so in cron's mail, briefly
        print(f"pollgate cron {name}: cannot start the app: {err}", file=sys.stderr)
        return 1
    try:
        with app.app_context(), cron_lock(name) as mine:
            state = migrate.schema_state()
            if not state.current:
                # New code on the old schema (or the reverse) would fail on a missing column.
                print(f"pollgate cron {name}: skipped until the upgrade: {migrate.describe(state)}", file=sys.stderr)
                return 1
            if not mine:
                print(f"pollgate cron {name}: a previous run is still going; skipping this one")
                return 0
            started = time.monotonic()
            result = TASKS[name]()
    except Exception as err:
        if not is_unavailable(err):
            raise
        # The next minute's run does the work; cron's mail gets one line, not a traceback.
        print(f"pollgate cron {name}: the database is unreachable ({err.__class__.__name__}); "
              "the next run tries again", file=sys.stderr)
        return 1
    figures = ", ".join(f"{k} {v}" for k, v in result.items())
    print(f"pollgate cron {name}: {figures} ({time.monotonic() - started:.1f} s)")
    return 0
