"""Faults around a request on a real gunicorn node: its worker dies, its gunicorn process dies, its client leaves.

Timings are short (nodes.FAST): a lease lapses after 2 s, a reader's hold after 3 s, and a
job nobody claims gives up after 3 s, so every fault shows within seconds.
"""
from __future__ import annotations

import os
import signal

import pytest
import requests

from faults import Call, Crew, echo, ticking
from nodes import FAST, bounded, pollclient, stack  # noqa: F401  (stack: a fixture)
from protocol import ProtoWorker
from support import wait_for
from webapp import settings

# How long after its cause a fault may take to show, on top of the timings involved: a busy
# 2-core machine, a gunicorn worker to reboot, a reaper that runs on the next request.
SLACK = 10


def allow_held(stack, slots: int = 20) -> None:
    """Cap held requests, so each one takes a slot in the database that a test can count."""
    with stack.app.app_context():
        settings.save({"max_streams": slots, "max_long_polls": slots})


def live_model(url: str, key: str) -> bool:
    r = requests.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=5)
    return "echo" in {m["id"] for m in r.json()["data"]}


@bounded(60)
def test_a_worker_killed_mid_stream_ends_the_stream_with_an_error_event(stack):
    words = " ".join(f"w{i}" for i in range(60))
    with stack.node(**FAST) as node, pollclient(node.url, stack.account.token, f"{stack.dir}/pollclient.log",
                                                "--echo-delay", "0.3") as worker:
        wait_for(lambda: live_model(node.url, stack.account.key), 20, "the pollclient to advertise echo")
        call = Call(node.url, stack.account.key, words)
        wait_for(lambda: call.text, 15, "the first words")
        os.kill(worker.pid, signal.SIGKILL)
        call.wait(FAST["LEASE_TTL"] + SLACK)
    # The text so far, then an error event on a response the gateway ended properly.
    assert call.ended == "closed" and call.error is not None, call
    assert words.startswith(call.text) and call.text != words
    job = stack.job(call.events[0]["id"])
    assert (job.state, job.error_code) == ("failed", "worker_lost")


@pytest.mark.parametrize("replaced", [True, False], ids=["another-worker-answers", "no-worker-left"])
@bounded(60)
def test_a_worker_lost_before_any_output_puts_the_job_back_in_the_queue(stack, replaced):
    # The stream starts (1 s after the claim) well before the silent worker's lease lapses (3 s).
    timings = {**FAST, "HEARTBEAT_INTERVAL": 1, "LEASE_TTL": 3}
    with stack.node(**timings) as node:
        lost = ProtoWorker(node.url, stack.account.token)
        lost.claim(wait=0)
        call = Call(node.url, stack.account.key, "who will answer me now")
        assert lost.claim(wait=10), "the worker got no job"  # ... and says nothing more, ever
        job = wait_for(lambda: [j for j in stack.jobs() if (j.state, j.attempts) == ("queued", 1)],
                       timings["LEASE_TTL"] + SLACK, "the lost worker's job back in the queue")[0]
        if replaced:
            with Crew(node.url, [stack.worker_token("second")], echo):
                call.wait(SLACK + 10)
            assert call.completed and call.text == "who will answer me now", call
            assert (stack.job(job.public_id).state, stack.job(job.public_id).attempts) == ("completed", 2)
        else:
            # The stream has started: it gets the 503 a new request would, as an event, not silence.
            call.wait(timings["DISPATCH_TIMEOUT"] + SLACK)
            assert call.status == 200 and call.ended == "closed" and call.text == "", call
            assert call.error is not None and call.error["code"] == "no_worker_available", call
            assert (stack.job(job.public_id).state, stack.job(job.public_id).error_code) == ("expired", "no_worker")


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
@bounded(60)
def test_a_client_that_hangs_up_cancels_its_job_and_the_worker_is_told(stack, stream):
    """The request sees its client go (a failed write, or gunicorn's socket) and cancels the job itself.

    Its hold lasts a minute, so the reaper's fallback for a reader that stopped renewing
    cannot be what cancels the job within the bound.
    """
    allow_held(stack)
    with stack.node(**{**FAST, "HOLD_TTL": 60}) as node, Crew(node.url, [stack.account.token], ticking) as crew:
        call = Call(node.url, stack.account.key, "hang up on me", stream=stream)
        job = wait_for(lambda: [j for j in stack.jobs() if j.state == "running" and j.next_seq >= 3],
                       SLACK, "the worker streaming the answer")[0]
        assert stack.held() == 1
        call.hang_up()
        wait_for(lambda: stack.job(job.public_id).state == "cancelled", SLACK, "the job cancelled")
        wait_for(lambda: crew.shift(job.public_id).told, SLACK, "the worker told to stop")
        wait_for(lambda: stack.held() == 0, SLACK, "the request's slot given back")
    cancelled = stack.job(job.public_id)
    assert (cancelled.error_code, cancelled.error_message) == ("client_gone", "The client went away.")
    assert crew.shift(job.public_id).told == "cancelled"
    assert not crew.errors


@bounded(90)
def test_a_killed_gunicorn_worker_frees_its_slots_and_stops_its_jobs(stack):
    allow_held(stack)
    # A report in flight when the process dies waits for its replacement to boot, seconds on a
    # busy machine: a lease longer than that makes the lapsed readers, not the lease, end the jobs.
    timings = {**FAST, "LEASE_TTL": 30}
    with stack.node(**timings) as node, Crew(node.url, [stack.account.token], ticking) as crew:
        calls = [Call(node.url, stack.account.key, f"request {i}", stream=i < 2) for i in range(3)]
        wait_for(lambda: len([j for j in stack.jobs() if j.state == "running" and j.next_seq >= 3]) == 3,
                 SLACK, "three answers streaming")
        assert stack.held() == 3
        victim = node.kill_worker()
        for call in calls:
            call.wait(SLACK)  # the kernel closes a dead process's sockets at once
        # Nobody renews the dead process's holds: after HOLD_TTL its slots lapse and its jobs are cancelled.
        wait_for(lambda: all(j.state == "cancelled" for j in stack.jobs()), timings["HOLD_TTL"] + SLACK,
                 "every job of the dead process cancelled")
        wait_for(lambda: stack.held() == 0, SLACK, "the dead process's slots freed")
        wait_for(lambda: all(s.told for s in crew.shifts), SLACK, "the worker told to stop each job")
        assert node.worker_pids() and victim not in node.worker_pids()
    assert [j.error_code for j in stack.jobs()] == ["client_gone"] * 3
    assert [s.told for s in crew.shifts] == ["cancelled"] * 3
    assert all(c.ended != "closed" for c in calls), calls  # sanity: the process really died under them
    assert not crew.errors
