"""Default settings; the instance config file and POLLGATE_* environment variables override them."""

# Database: SQLite in the instance folder unless DATABASE_URL says otherwise.
DATABASE_URL = None
# Signs session cookies. None: create_app makes a random one once and keeps it in
# instance/secret-key (mode 0600). Several nodes must share one: set SECRET_KEY.
SECRET_KEY = None
# The public URL of the gateway (https://example.com/api). Links the app hands out (the
# worker command, the userscript's @connect and @updateURL, invites) use it, never the
# request's Host header; https here also marks cookies Secure. The installer sets it.
SITE_URL = None
# How many proxies in front of the app set X-Forwarded-For/-Proto/-Host/-Prefix (nginx
# in front of gunicorn: 1). 0 trusts none of those headers: under Passenger the client
# address is the real one, and a forwarded one would be the client's own claim.
TRUSTED_PROXIES = 0

# Session cookies: never readable by scripts, not sent on cross-site requests; the
# installer turns SESSION_COOKIE_SECURE on when the site URL is https.
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
SESSION_COOKIE_SECURE = False
REMEMBER_COOKIE_HTTPONLY = True
# Sign-in throttling, per client address, so guesses lock out only the guesser: this
# many attempts at one email from one address within the window (a success clears
# them), and this many failures from one address at any emails (an IPv6 /64 counts as
# one address). Seconds in the window.
SIGNIN_MAX_FAILURES = 5
SIGNIN_MAX_FAILURES_PER_ADDRESS = 50
SIGNIN_THROTTLE_WINDOW = 900.0
# The CSRF token lives as long as the session instead of one hour, so a form left
# open over lunch still submits.
WTF_CSRF_TIME_LIMIT = None

# One request per Passenger process, and shared hosts cap max_user_connections (10-25):
# keep a tiny pool. Threaded gunicorn nodes raise it.
DB_POOL_SIZE = 2
DB_POOL_RECYCLE = 280  # seconds; below MySQL's usual wait_timeout of 300 on shared hosts

# Claim path: "auto" detects SKIP LOCKED (MySQL 8.0.1+, MariaDB 10.6+), else compare-and-swap.
CLAIM_PATH = "auto"

# The tier of users who have none set (tiers are rows the admin edits).
DEFAULT_TIER = "free"

# Queue timings, in seconds.
CLAIM_WAIT_MAX = 25.0  # longest a worker's long-poll is held (nginx fronts drop at 60 s)
LEASE_TTL = 15.0  # a claimed job is lost if its worker stays silent this long (it heartbeats at a third)
DISPATCH_TIMEOUT = 30.0  # an API request with no worker picking it up by then gets 503
JOB_TIMEOUT = 600.0  # hard deadline for a job from submission (504 past it)
JOB_MAX_ATTEMPTS = 3  # claims per job before a lost worker fails it (AI Horde fails after 2 faults)
PRIORITY_AGING = 30.0  # one priority step is worth this many seconds of waiting
MODEL_LIVE_WINDOW = 90.0  # a worker advertises its models this long after it was last seen
# A stream whose client hung up leaves its job running this long for a resume
# (GET /v1/chat/completions/{id}?stream=true) before the reaper cancels it; 0 cancels at once.
RESUME_GRACE = 10.0
HEARTBEAT_INTERVAL = 15.0  # SSE comment on a silent stream (nginx drops silent sockets at 60 s)

# Wake-ups: waiters watch bell files (one stat per file per tick in each process) and
# re-check the database only every WAKE_RECHECK seconds: a long-poll itself, open API
# requests through their process's tailer, one statement for all of them. Nodes that do
# not share WAKE_DIR see each other's news within WAKE_RECHECK.
WAKE_DIR = None  # default: <instance>/bells; point several nodes at one shared folder
WAKE_TICK = 0.002  # one watcher thread per process does the stats, so a short tick is cheap
WAKE_RECHECK = 2.0
REAP_INTERVAL = 10.0  # how often a process reaps expired leases lazily on the request path

# Readers' heartbeat: each process's tailer renews its open API requests' holds (and their
# jobs') every HOLD_RENEW seconds; one not renewed for HOLD_TTL seconds belongs to a dead
# process, so its slot is freed and its job cancelled. Keep HOLD_TTL a few renewals long:
# a renewal can wait on a busy database.
HOLD_RENEW = 5.0
HOLD_TTL = 30.0
# A stream that cannot read the database retries this long before it ends with an error
# event; a MariaDB restart takes a few seconds.
DB_OUTAGE_GRACE = 15.0
# Held requests (long-polls plus open API requests) one process may hold; 0 for no cap.
# A threaded server must keep threads free for workers' chunk reports and for pages, or
# held streams starve the reports their own answers need; gunicorn.conf.py derives it
# from its thread count. Under Passenger a process serves one request, so 0.
MAX_HELD_PER_PROCESS = 0
# No one user (with their workers) may hold more than this share of each kind's budget.
FAIR_SHARE = 0.75

# Body limits: MySQL 5.7's max_allowed_packet can be 4 MB.
MAX_CONTENT_LENGTH = 4 * 1024 * 1024
MAX_CHUNKS_PER_REPORT = 2000
