"""Pollgate's worker: long-polls the gateway for chat jobs and streams the answers back."""

__version__ = "0.1.0"
