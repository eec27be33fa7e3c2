"""gunicorn settings for the bench: none beyond its command line, on purpose.

Naming this file with -c keeps gunicorn from reading the repository's gunicorn.conf.py
from its working directory, so every phase runs the shape `stack.py` states (see
`Stack.gunicorn_options`). The idle phase names count_queries.py instead, to the same end.
"""
