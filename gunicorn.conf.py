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
