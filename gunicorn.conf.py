"""Gunicorn settings for a VPS or multi-node setup: gunicorn -c gunicorn.conf.py passenger_wsgi:application

Every held request (a worker's long-poll, an open stream) occupies a thread, so nodes use
threaded workers with many threads rather than many processes. Nodes share nothing but
the MySQL server (and, if they can, the bell folder WAKE_DIR for instant wake-ups).
"""
import multiprocessing
import os

bind = os.environ.get("POLLGATE_BIND", "127.0.0.1:8000")
worker_class = "gthread"
# A process per core; each thread is one open request, idle ones cost little.
workers = int(os.environ.get("POLLGATE_WORKERS", multiprocessing.cpu_count()))
threads = int(os.environ.get("POLLGATE_THREADS", 64))
# Held requests may take at most three quarters of the threads (and never the last four):
# the rest stay free for workers' chunk reports, claims that answer at once and pages,
# or held streams would starve the very reports their answers wait for. Past the cap a
# held request is refused at once with Retry-After. Set before the workers fork, so the
# app in each one reads it (POLLGATE_* environment variables override the defaults).
os.environ.setdefault("POLLGATE_MAX_HELD_PER_PROCESS", str(max(1, min(threads * 3 // 4, threads - 4))))
# Each thread holds a database connection only for one short transaction at a time.
os.environ.setdefault("POLLGATE_DB_POOL_SIZE", str(max(2, min(10, threads // 4))))
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
