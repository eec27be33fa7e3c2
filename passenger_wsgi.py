"""Phusion Passenger's entry point: cPanel's "Setup Python App" serves `application` from here.

Until the installer has written instance/pollgate.cfg this serves the web installer; from
then on, the app (gunicorn nodes use it too: gunicorn passenger_wsgi:application).
"""
import os
import sys

# Passenger starts Python in the app root but does not put it on sys.path.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from webapp.install_views import SiteSwitch  # noqa: E402

application = SiteSwitch()
# Build the app and load tiktoken while the process starts: Passenger sends a process no
# request until this import returns, so the work is done before its first request, not in it.
application.warm()
