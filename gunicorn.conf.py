"""Gunicorn settings for a VPS or multi-node setup: gunicorn -c gunicorn.conf.py passenger_wsgi:application

Every held request (a worker's long-poll, an open stream) waits in the server, so a node
needs a cheap way to hold many. Two worker classes are offered (POLLGATE_WORKER_CLASS):

- gthread (the default): a thread per request, 64 per process; nothing to install.
- gevent: a greenlet per request, so one process holds thousands of streams (pip install
  gevent). Flask, SQLAlchemy and PyMySQL are pure Python and cooperate once gunicorn's
  gevent worker has patched the standard library. Not yet for production: under a
  saturated CPU workers' reports queue behind the streams (docs/deploy.md).

Nodes share nothing but the MySQL server (and, if they can, the bell folder WAKE_DIR for
instant wake-ups).
"""
import multiprocessing
import os
import resource

bind = os.environ.get("POLLGATE_BIND", "127.0.0.1:8000")
worker_class = os.environ.get("POLLGATE_WORKER_CLASS", "gthread")
# A process per core.
workers = int(os.environ.get("POLLGATE_WORKERS", multiprocessing.cpu_count()))
if worker_class == "gevent":
    # A greenlet costs a few KB, so the limit is open sockets, not memory.
    worker_connections = int(os.environ.get("POLLGATE_CONNECTIONS", 4000))
    # Held requests may take half the connections, less a margin: each held stream brings
    # its worker's connection for chunk reports (a pollclient keeps one per running job),
    # an idle keep-alive connection keeps its greenlet too, and claims and pages need room.
    held = worker_connections // 2 - 32
    concurrency = worker_connections
    # Every connection is a file: lift the soft limit (often 1024) toward the hard one.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = worker_connections + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard), hard))
else:
    # Each thread is one open request; idle ones cost little.
    threads = int(os.environ.get("POLLGATE_THREADS", 64))
    # Held requests may take at most three quarters of the threads (and never the last four):
    # the rest stay free for workers' chunk reports, claims that answer at once and pages,
    # or held streams would starve the very reports their answers wait for.
    held = min(threads * 3 // 4, threads - 4)
    concurrency = threads
# Past the cap a held request is refused at once with Retry-After. Set before the workers
# fork, so the app in each one reads it (POLLGATE_* environment variables override it).
os.environ.setdefault("POLLGATE_MAX_HELD_PER_PROCESS", str(max(1, held)))
# Each thread holds a database connection only for one short transaction at a time.
os.environ.setdefault("POLLGATE_DB_POOL_SIZE", str(max(2, min(10, concurrency // 4))))
# Long-polls last CLAIM_WAIT_MAX (25 s) and streams up to JOB_TIMEOUT (600 s); the
# timeout only guards against a stuck worker process, so it must exceed both.
timeout = 660
graceful_timeout = 30
keepalive = 30
# Access logs carry the path without its query string (an invite link's secret travels
# there) and never the Authorization header.
accesslog = "-"
access_log_format = '%(h)s %(t)s "%(m)s %(U)s" %(s)s %(b)s %(M)sms'
errorlog = "-"

