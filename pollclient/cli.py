"""Command line: read options (or POLLCLIENT_* variables), check them, run the worker."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from . import __version__
from .backends import BACKENDS, BackendConfig, BackendError, list_upstream_models
from .gateway import Gateway
from .runner import Worker

log = logging.getLogger("pollclient")

MAX_MODELS = 64  # the protocol's limit per claim
MAX_CAPACITY = 256
TRUE = ("1", "true", "yes", "on")

EPILOG = """\
examples:
  python pollclient --api-url http://127.0.0.1:5000 --token pgw_... --backend echo
  python pollclient --api-url https://example.com/api --token pgw_... \\
      --backend openai --upstream-url http://localhost:11434/v1 --max-concurrent 4

Ctrl-C stops claiming and lets running jobs finish (up to --drain-timeout);
a second Ctrl-C hands them back to the gateway at once.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see --help)")


def fail(message: str, status: int = 2) -> NoReturn:
    """Print one readable error line and exit."""
    print(f"pollclient: error: {message}", file=sys.stderr)
    raise SystemExit(status)


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"POLLCLIENT_{name}") or default


def _number(low: float, high: float | None = None, kind: type = float):
    """Make an argparse type that accepts a number in [low, high]."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text} is out of range ({low} to {high if high is not None else 'any'})")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """Describe the options; each one defaults from a POLLCLIENT_* variable named in --help."""
    p = _Parser(
        prog="pollclient",
        description="Serve Pollgate jobs: long-poll the gateway, run each job on a backend, stream the answer back.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = p.add_argument
    # Defaults come from the environment, but --help shows only the built-in ones, so a
    # token or key set in the environment never lands on the screen.
    add("--api-url", metavar="URL", default=_env("API_URL"),
        help="gateway base URL, e.g. http://127.0.0.1:5000 or https://host/api [env POLLCLIENT_API_URL]")
    add("--token", metavar="TOKEN", default=_env("TOKEN"),
        help="worker token (pgw_...), required [env POLLCLIENT_TOKEN]")
    add("--backend", choices=sorted(BACKENDS), default=_env("BACKEND", "echo"),
        help="what answers the jobs: echo repeats the last user message, openai calls an "
        "OpenAI-compatible server [env POLLCLIENT_BACKEND, default echo]")
    add("--models", metavar="A,B", default=_env("MODELS"),
        help="comma-separated model ids to serve [env POLLCLIENT_MODELS; default: echo for the echo backend, "
        "the upstream's GET /models for openai]")
    add("--upstream-url", metavar="URL", default=_env("UPSTREAM_URL"),
        help="OpenAI-compatible base URL for the openai backend, e.g. http://localhost:11434/v1 "
        "[env POLLCLIENT_UPSTREAM_URL]")
    add("--upstream-key", metavar="KEY", default=_env("UPSTREAM_KEY", ""),
        help="API key for the upstream, sent as a Bearer token [env POLLCLIENT_UPSTREAM_KEY]")
    add("--allow-private-image-urls", action="store_true",
        default=(_env("ALLOW_PRIVATE_IMAGE_URLS") or "").lower() in TRUE,
        help="let the upstream fetch image URLs on private, loopback and link-local addresses (this "
        "machine's network); off by default, as any gateway user writes those URLs "
        "[env POLLCLIENT_ALLOW_PRIVATE_IMAGE_URLS=1]")
    add("--site", metavar="NAME", default=_env("SITE", ""),
        help="a provider name for this worker, e.g. ollama or home-gpu: callers who send "
        "X-Provider: NAME reach only workers reporting it [env POLLCLIENT_SITE]")
    add("--max-concurrent", metavar="N", type=_number(1, MAX_CAPACITY, int), default=_env("MAX_CONCURRENT", "1"),
        help="jobs run at once [env POLLCLIENT_MAX_CONCURRENT, default 1]")
    add("--echo-delay", metavar="SECONDS", type=_number(0), default=_env("ECHO_DELAY", "0"),
        help="pause between echoed words [env POLLCLIENT_ECHO_DELAY, default 0]")
    add("--flush-interval", metavar="SECONDS", type=_number(0, 10), default=_env("FLUSH_INTERVAL", "0.05"),
        help="how often output is batched to the gateway; the first delta after a pause goes at once "
        "[env POLLCLIENT_FLUSH_INTERVAL, default 0.05]")
    add("--poll-wait", metavar="SECONDS", type=_number(0, 25), default=_env("POLL_WAIT", "25"),
        help="how long the gateway holds an idle claim [env POLLCLIENT_POLL_WAIT, default 25]")
    add("--drain-timeout", metavar="SECONDS", type=_number(0), default=_env("DRAIN_TIMEOUT", "10"),
        help="on Ctrl-C or SIGTERM, how long running jobs may finish before they are handed back "
        "[env POLLCLIENT_DRAIN_TIMEOUT, default 10]")
    add("--max-jobs", metavar="N", type=_number(0, None, int), default=_env("MAX_JOBS", "0"),
        help="exit after this many jobs, 0 for no limit [env POLLCLIENT_MAX_JOBS, default 0]")
    add("--once", action="store_const", const=1, dest="max_jobs", help="exit after one job (--max-jobs 1)")
    add("--log-level", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"], default=_env("LOG_LEVEL", "INFO"),
        help="how much to log on stderr [env POLLCLIENT_LOG_LEVEL, default INFO]")
    add("--version", action="version", version=f"pollclient {__version__}")
    return p


def parse_settings(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the options; exit with one readable line when they cannot work."""
    args = build_parser().parse_args(argv)
    # argparse checks choices on the command line only, not on defaults from the environment.
    if args.backend not in BACKENDS:
        fail(f"POLLCLIENT_BACKEND must be one of {', '.join(sorted(BACKENDS))}, not {args.backend!r}")
    if args.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        fail(f"POLLCLIENT_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, not {args.log_level!r}")
    if not args.token:
        fail("no worker token: pass --token or set POLLCLIENT_TOKEN (create one in the dashboard)")
    if not args.api_url:
        fail("no gateway URL: pass --api-url or set POLLCLIENT_API_URL")
    args.api_url = _check_url(args.api_url, "--api-url")
    args.site = args.site.strip()
    if len(args.site) > 191 or not all(c.isprintable() for c in args.site):
        fail("--site must be at most 191 printable characters")
    if args.backend == "openai":
        if not args.upstream_url:
            fail("the openai backend needs --upstream-url (e.g. http://localhost:11434/v1)")
        args.upstream_url = _check_url(args.upstream_url, "--upstream-url")
    args.models = list(dict.fromkeys(m.strip() for m in (args.models or "").split(",") if m.strip()))
    if len(args.models) > MAX_MODELS:
        fail(f"--models lists {len(args.models)} models; a worker serves at most {MAX_MODELS}")
    if any(len(m) > 191 for m in args.models):
        fail("--models: a model id is longer than 191 characters")
    return args


def _check_url(url: str, option: str) -> str:
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        fail(f"{option} must be an http:// or https:// URL, got {url!r}")
    if parts.query or parts.fragment:
        fail(f"{option} must be a base URL without ?query or #fragment, got {url!r}")
    return url.strip().rstrip("/")


def resolve_models(args: argparse.Namespace, config: BackendConfig) -> list[str]:
    """Return the models to serve, checking that an openai upstream answers."""
    if args.backend == "echo":
        return args.models or ["echo"]
    try:
        found = list_upstream_models(config)
    except BackendError as exc:
        if args.models and exc.code != "upstream_unavailable":
            # Some servers have no /models; the models named on the command line will do.
            log.warning("could not list the upstream's models (%s); serving %s", exc, ", ".join(args.models))
            return args.models
        fail(str(exc) if exc.code == "upstream_unavailable" else f"cannot list the upstream's models: {exc}", 1)
    if args.models:
        missing = [m for m in args.models if m not in found]
        if missing and found:
            log.warning("the upstream does not list %s; serving it anyway", ", ".join(missing))
        return args.models
    if not found:
        fail(f"the upstream at {args.upstream_url} lists no models; name them with --models", 1)
    if len(found) > MAX_MODELS:
        log.warning("the upstream lists %d models; serving the first %d (choose with --models)", len(found), MAX_MODELS)
    return found[:MAX_MODELS]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the worker; return the process exit status."""
    args = parse_settings(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)-7s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr
    )
    session = requests.Session()
    # One pooled connection per running job, or urllib3 warns and discards connections.
    adapter = HTTPAdapter(pool_maxsize=max(10, args.max_concurrent + 2))
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    config = BackendConfig(
        upstream_url=args.upstream_url or "", upstream_key=args.upstream_key or "",
        echo_delay=args.echo_delay, allow_private_image_urls=args.allow_private_image_urls, session=session,
    )
    gateway = Gateway(args.api_url, args.token, args.site)
    try:
        args.models = resolve_models(args, config)
        return Worker(args, gateway, config).run()
    except KeyboardInterrupt:
        return 130  # Ctrl-C before the worker installed its handlers
    finally:
        gateway.close()
        session.close()
