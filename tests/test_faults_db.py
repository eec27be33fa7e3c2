"""The database dies under a real gunicorn node: mariadbd is killed with SIGKILL mid-stream and restarted.

These tests kill a throwaway MariaDB of their own, never the session's shared one.
"""
from __future__ import annotations

import threading
import time

import pytest

from conftest import throwaway_mariadb
from faults import Call, Crew, held_until
from nodes import FAST, WORKER_CLASSES, bounded, make_stack
from support import wait_for

# A lease outlives the outage, so a stream whose database comes back in time can finish.
SETTINGS = {**FAST, "LEASE_TTL": 10}
SLACK = 10


@pytest.fixture(scope="module")
def lone_mariadb():
    """A MariaDB these tests may kill."""
    yield from throwaway_mariadb()


@pytest.fixture(params=WORKER_CLASSES)
def lone_stack(lone_mariadb, tmp_path, request):
    if not lone_mariadb.running:
        lone_mariadb.restart()  # a test that failed mid-outage left it down
    yield from make_stack(lone_mariadb, tmp_path, request.param)


def streams(node, stack, count: int) -> list[Call]:
    """Open streams and wait until each has its first word."""
    calls = [Call(node.url, stack.account.key, f"stream {i} keeps going through the outage") for i in range(count)]
    wait_for(lambda: all(c.text for c in calls), SLACK, "each stream's first word")
    return calls


@bounded(90)
def test_streams_ride_out_a_database_restart(lone_stack):
    server, release = lone_stack.server, threading.Event()
    with lone_stack.node(**SETTINGS) as node, \
            Crew(node.url, [lone_stack.account.token], held_until(release)) as crew:
        calls = streams(node, lone_stack, 3)
        processes = node.worker_pids()
        server.kill()
        down_at = time.monotonic()
        try:
            probe = Call(node.url, lone_stack.account.key, "a new request meanwhile", stream=False).wait(2.5)
        finally:
            server.restart()
        outage = time.monotonic() - down_at
        release.set()
        for call in calls:
            call.wait(SLACK + 10)
        after = Call(node.url, lone_stack.account.key, "and one after the restart").wait(SLACK)
        assert node.worker_pids() == processes  # recovered in place: no process crashed or restarted
    assert probe.status == 503 and probe.error["code"] == "database_unavailable", probe
    assert int(probe.headers["retry-after"]) > 0
    assert outage < SETTINGS["LEASE_TTL"], "the harness was too slow: leases, not the gateway, would end the streams"
    for call in calls:
        assert call.completed and call.text == call.content, call
    assert after.completed and after.text == "and one after the restart", after
    assert not crew.errors


@bounded(90)
def test_an_outage_past_the_grace_ends_streams_with_an_error_event(lone_stack):
    server, release, grace = lone_stack.server, threading.Event(), 3
    with lone_stack.node(**SETTINGS, DB_OUTAGE_GRACE=grace) as node, \
            Crew(node.url, [lone_stack.account.token], held_until(release)):
        calls = streams(node, lone_stack, 2)
        server.kill()
        down_at = time.monotonic()
        try:
            for call in calls:
                call.wait(grace + SLACK)
        finally:
            server.restart()
        release.set()
        after = Call(node.url, lone_stack.account.key, "back after the outage").wait(SLACK)
    for call in calls:
        # An OpenAI error event, then [DONE], on a connection the server closed properly.
        assert call.ended == "closed" and call.events[-1] == "[DONE]", call
        assert "error" in call.events[-2] and call.error["code"] == "database_unavailable", call
        assert call.ended_at - down_at >= grace * 0.8, f"gave up before the grace: {call}"
    assert after.completed and after.text == "back after the outage", after
