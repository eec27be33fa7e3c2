"""Run the worker as `python pollclient` (the folder) or `python -m pollclient`."""
import os
import sys

if __package__ in ("", None):
    # Run as a folder, sys.path[0] is this folder: its modules would be importable as
    # top-level names (and could shadow others). Import the package from its parent instead,
    # as pip's own __main__.py does.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, os.path.dirname(here))

from pollclient.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
