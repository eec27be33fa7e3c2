"""cPanel cron, nightly: settle stragglers and rebuild the last days' usage roll-ups from the usage rows."""
import os, sys  # noqa: E401

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from webapp.cron import run_from_cron  # noqa: E402

sys.exit(run_from_cron("rollup"))
