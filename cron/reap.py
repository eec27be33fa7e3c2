"""cPanel cron, every minute: re-queue the jobs of lost workers, expire stale ones, settle their usage."""
import os, sys  # noqa: E401

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from webapp.cron import run_from_cron  # noqa: E402

sys.exit(run_from_cron("reap"))
