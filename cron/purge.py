"""cPanel cron, hourly: delete prompts, answers and ended jobs past retention, old rate counters and old events."""
import os, sys  # noqa: E401

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from webapp.cron import run_from_cron  # noqa: E402

sys.exit(run_from_cron("purge"))
