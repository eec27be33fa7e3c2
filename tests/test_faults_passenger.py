"""Faults around a request served by a real Apache + mod_passenger (one request per process), on MariaDB.

Timings are short (nodes.FAST): a reader renews its hold every 0.5 s and a hold not renewed
for 3 s is dead; the lease (30 s) and the dispatch timeout (10 s) stay out of the way.

What Debian's Passenger 6.0.17 does, as measured here with strace and passenger-status:

- kill -9 of the app process serving a stream: the Passenger core ends the client's
  response cleanly at the HTTP level (the last chunk arrives), so the client sees the
  text so far and then an end with neither an error event nor [DONE]. Nobody renews the
  hold: the lazy reaper cancels the job (client_gone) within HOLD_TTL plus a reap.
- A stream's client hangs up: Apache fails a write to the client and drops its
  connection to the core, which closes its connection to the app process. The app's
  first three writes after the hang-up (chunks, or the keep-alive every
  HEARTBEAT_INTERVAL) still succeed; the fourth fails with EPIPE, the WSGI loader closes
  the response iterator and GeneratorExit runs end_request (the loader logs nothing for
  EPIPE). A chunk every 0.1 s: 0.45 s; keep-alives only, every 2 s: 7.2 s.
- A plain (non-streamed) request's client hangs up: nothing reaches the app. Apache is
  blocked reading the core and leaves the client's socket in CLOSE_WAIT, the core keeps
  the request and its connection to the app open, and the app cannot see the socket
  (Passenger's environ has only `passenger.hijack`; its connection already reads EOF once
  the body is read, hang-up or not). The request runs until its job ends, renewing its
  hold all along; then its answer is written without error and discarded, the job is
  `completed`, not cancelled, and usage is settled once, for the whole answer.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import signal
import threading
from collections import defaultdict
from urllib.parse import urlsplit

import pytest
from sqlalchemy import func, select

from faults import Call, Crew, echo, held_until, ticking
from nodes import FAST, bounded, count, make_stack
from support import wait_for
from webapp import settings
from webapp.models import HeldRequest, Usage, UsageDaily, utcnow

TIMINGS = {**FAST, "LEASE_TTL": 30, "DISPATCH_TIMEOUT": 10, "DEFAULT_TIER": None}
HOLD_TTL, REAP = TIMINGS["HOLD_TTL"], TIMINGS["REAP_INTERVAL"]
# How long after its cause a fault may take to show, on top of the timings involved: a busy
# 2-core machine, and Passenger spawning a process (about 2 s of CPU) for the next request.
SLACK = 15
CHAT = "/v1/chat/completions"
RELEASES: dict[str, threading.Event] = defaultdict(threading.Event)


class SiteCall(Call):
    """A faults.Call under the site's base URI (Call posts to /v1/... at the server's root)."""

    def __init__(self, url: str, *args, **kwargs) -> None:
        self.base = urlsplit(url).path
        super().__init__(url, *args, **kwargs)

    def _run(self) -> None:
        request = self.conn.request
        self.conn.request = lambda method, path, *a, **kw: request(method, self.base + path, *a, **kw)
        super()._run()


def by_prompt(shift) -> None:
    """"tick ...": tick until told to stop; "hold ...": one word, heartbeats until released; else echo."""
    if shift.prompt.startswith("tick"):
        ticking(shift)
    elif shift.prompt.startswith("hold"):
        held_until(RELEASES[shift.prompt])(shift)
    else:
        echo(shift)


@pytest.fixture(scope="module")
def stack(mariadb, tmp_path_factory):
    """A database on the session's MariaDB with one account, shared by this module's tests."""
    yield from make_stack(mariadb, tmp_path_factory.mktemp("faults-passenger"))


@pytest.fixture(scope="module")
def site(stack, passenger_site):
    """Apache + Passenger on that database; held requests capped, so each takes a slot we can count."""
    with stack.app.app_context():
        settings.save({"max_streams": 20, "max_long_polls": 20})
    env = {"DATABASE_URL": stack.db_url, "SECRET_KEY": "faults-passenger",
           **{f"POLLGATE_{name}": json.dumps(value) for name, value in TIMINGS.items()}}
    return passenger_site(env, migrate=False)


@pytest.fixture(scope="module")
def crew(stack, site):
    """One crew for the module, so no stopped crew's last claim can take a later test's job."""
    with Crew(site.url, [stack.account.token], by_prompt) as crew:
        warm_up(stack, site)
        yield crew


def warm_up(stack, site) -> None:
    """Have the site serve two completions at once, so the tests start on processes already spawned.

    A stream, the crew's long-poll and its chunk reports each hold a process. Spawning one
    takes seconds of CPU, and on a busy machine the crew's claim can wait on a spawn past
    DISPATCH_TIMEOUT. A spawned process stays (PassengerPoolIdleTime is 300 s), so this is once.
    """
    calls: list[SiteCall] = []
    for attempt in range(3):
        batch = [SiteCall(site.url, stack.account.key, f"warm up {attempt}.{n}") for n in range(2)]
        calls += [call.wait(TIMINGS["DISPATCH_TIMEOUT"] + 60) for call in batch]
        if all(call.completed for call in batch):
            return
    raise AssertionError(f"the site never served two completions: {calls}\n{site.logs()[-4000:]}")


def job_of(stack, call: SiteCall, state: str = "running", seq: int = 1):
    """Wait until the call's job is in state with at least seq chunks; return it, or fail saying what the call got."""
    def found():
        jobs = [j for j in stack.jobs() if j.request["messages"][-1]["content"] == call.content]
        if call.done.is_set() and not any(j.state == state and j.next_seq >= seq for j in jobs):
            raise AssertionError(f"the call ended first: {call}; its jobs: {[(j.state, j.error_code) for j in jobs]}")
        return [j for j in jobs if j.state == state and j.next_seq >= seq]
    return wait_for(found, SLACK + 10, f"{call.content!r} {state}")[0]


def slots_since(stack, since: dt.datetime) -> int:
    """Count the streams' slots taken since then, lapsed ones too: a request that ends deletes its own."""
    return stack.scalar(count(HeldRequest, HeldRequest.kind == "streams", HeldRequest.created_at >= since))


def settled_once(stack, job) -> Usage:
    """Wait until the job's usage row is settled; check the roll-up counted every settled row once."""
    row = wait_for(lambda: stack.scalar(select(Usage).where(Usage.job_id == job.id, Usage.settled.is_(True))),
                   SLACK, "the usage settled")
    assert stack.scalar(count(Usage, Usage.job_id == job.id)) == 1
    assert stack.scalar(select(func.sum(UsageDaily.requests))) == stack.scalar(count(Usage, Usage.settled.is_(True)))
    return row


@bounded(120)
def test_a_killed_passenger_process_frees_its_slot_and_stops_its_job(stack, site, crew):
    since = utcnow()
    call = SiteCall(site.url, stack.account.key, "tick until the process dies")
    job = job_of(stack, call, seq=3)
    assert stack.held() == 1
    victims = site.serving(CHAT)  # Passenger's own view: which process serves the stream
    assert len(victims) == 1 and victims[0] in site.app_pids(), (victims, site.app_pids())
    os.kill(victims[0], signal.SIGKILL)
    # Nobody renews the dead process's hold: its slot lapses, and the crew's long-poll, reaping
    # every REAP_INTERVAL, cancels the job.
    wait_for(lambda: stack.job(job.public_id).state == "cancelled", HOLD_TTL + REAP + SLACK, "the job cancelled")
    wait_for(lambda: stack.held() == 0, SLACK, "the dead process's slot freed")
    call.wait(SLACK)
    wait_for(lambda: crew.shift(job.public_id).told, SLACK, "the worker told to stop")
    assert stack.job(job.public_id).error_code == "client_gone"
    assert crew.shift(job.public_id).told == "cancelled"
    assert settled_once(stack, job).status == "cancelled"
    assert victims[0] not in site.app_pids()
    assert slots_since(stack, since) == 1  # lapsed, not given back: the process never cleaned up
    # Passenger ends the response as if it were whole: no error event, no [DONE].
    assert call.ended == "closed" and call.text.startswith("tick") and call.error is None, call
    assert "[DONE]" not in call.events, call
    after = SiteCall(site.url, stack.account.key, "the site still serves").wait(SLACK + 20)
    assert after.completed and after.text == "the site still serves", after
    assert not crew.errors


@pytest.mark.parametrize("prompt", ["tick, a chunk every 0.1 s", "hold, only keep-alives"],
                         ids=["chunks", "keep-alives"])
@bounded(90)
def test_a_stream_whose_client_hangs_up_cancels_its_job_within_a_few_writes(stack, site, crew, prompt):
    RELEASES[prompt]  # never released: after its first word the worker only heartbeats
    since = utcnow()
    call = SiteCall(site.url, stack.account.key, prompt)
    job = job_of(stack, call)
    wait_for(lambda: call.text, SLACK, "the stream started")
    assert stack.held() == 1
    call.hang_up()
    # The app's fourth write after the hang-up is the one that fails (see above).
    wait_for(lambda: stack.job(job.public_id).state == "cancelled", 4 * TIMINGS["HEARTBEAT_INTERVAL"] + SLACK,
             "the job cancelled")
    wait_for(lambda: crew.shift(job.public_id).told, SLACK, "the worker told to stop")
    wait_for(lambda: stack.held() == 0, SLACK, "the request's slot given back")
    wait_for(lambda: not site.serving(CHAT), SLACK, "Passenger done with the request")
    assert stack.job(job.public_id).error_code == "client_gone"
    assert crew.shift(job.public_id).told == "cancelled"
    assert settled_once(stack, job).status == "cancelled"
    assert slots_since(stack, since) == 0  # given back by the request's own end_request: the app saw it
    assert not crew.errors


@bounded(90)
def test_a_plain_request_whose_client_hangs_up_runs_until_its_job_ends(stack, site, crew):
    """Passenger never tells the app that a plain request's client left (see the module's docstring).

    The request runs on as if the client were there: it renews its hold, keeps its slot and
    its Passenger process, and the worker is never told to stop. When the worker finishes,
    the answer is written without error (and dropped by Apache), the job ends `completed`,
    not cancelled, the slot is given back, and usage is settled once, for the whole answer.
    A worker that never finishes holds all this until JOB_TIMEOUT.
    """
    prompt = "hold the plain answer"
    release = RELEASES[prompt]
    since = utcnow()
    call = SiteCall(site.url, stack.account.key, prompt, stream=False)
    job = job_of(stack, call)
    serving = site.serving(CHAT)
    assert len(serving) == 1 and stack.held() == 1
    call.hang_up()
    call.wait(SLACK)
    gone = utcnow()
    # The request lives on: it renews its hold past the point where a dead one would have been
    # reaped (the crew's long-poll reaps every REAP_INTERVAL), and Passenger still serves it.
    wait_for(lambda: stack.job(job.public_id).reader_expires_at > gone + dt.timedelta(seconds=2 * HOLD_TTL + REAP),
             HOLD_TTL + SLACK, "a renewal HOLD_TTL after the hang-up")
    assert stack.job(job.public_id).state == "running" and stack.held() == 1
    assert site.serving(CHAT) == serving
    assert crew.shift(job.public_id).told is None
    release.set()
    wait_for(lambda: stack.job(job.public_id).state == "completed", SLACK, "the job completed")
    wait_for(lambda: stack.held() == 0, SLACK, "the request's slot given back")
    wait_for(lambda: not site.serving(CHAT), SLACK, "Passenger done with the request")
    assert crew.shift(job.public_id).told == "finished"
    assert slots_since(stack, since) == 0
    usage = settled_once(stack, job)
    assert (usage.status, usage.stream) == ("completed", False) and usage.completion_tokens > 0
    assert not crew.errors
