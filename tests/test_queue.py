"""Queue semantics on SQLite and MariaDB: claims, leases, reports, releases, the reaper."""
from __future__ import annotations

import contextlib
import random
import threading
import time
from collections import Counter

import pytest
import requests
from sqlalchemy import func, select

from conftest import VALIDATION_ONLY, make_account
from protocol import ProtoWorker, WorkerThread
from webapp import budget, jobs, settings
from webapp.db import skip_locked_from_version
from webapp.models import Chunk, Job, Worker

REQUEST = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}


def submit(app, account, n=1, priority=0, model="echo"):
    """Queue n jobs directly, as the API would."""
    with app.app_context():
        return [jobs.submit_job(account.user_id, None, model, REQUEST, False, priority)[0].id for _ in range(n)]


def job_row(app, job_id) -> Job:
    with app.app_context():
        job, _ = jobs.read_progress(job_id, 0)
        return job


def chunk_rows(app, job_id):
    with app.app_context():
        _, chunks = jobs.read_progress(job_id, 0)
        return [(c.seq, c.delta) for c in chunks]


@pytest.mark.parametrize(
    "version, expected",
    [("10.3.39-MariaDB", False), ("10.5.22-MariaDB-log", False), ("10.6.1-MariaDB", True),
     ("10.11.6-MariaDB-0+deb12u1", True), ("5.7.44-log", False), ("8.0.0", False), ("8.0.36", True)],
)
def test_skip_locked_detection(version, expected):
    assert skip_locked_from_version(version) is expected


@pytest.mark.parametrize("app_config", [{"PRIORITY_AGING": 0.05}])
def test_jobs_go_by_priority_then_age_and_old_jobs_overtake(app, account, live):
    old_low = submit(app, account, priority=0)[0]
    time.sleep(0.3)  # waited 0.3 s: worth six priority steps of 0.05 s
    newer_mid = submit(app, account, priority=2)[0]  # worth 0.1 s: behind old_low
    newest_high = submit(app, account, priority=200)[0]  # worth 10 s: ahead of everything, even on a slow machine
    worker = ProtoWorker(live.url, account.token)
    order = [j["id"] for j in worker.claim(max_jobs=3)]
    ids = {job_row(app, i).public_id: i for i in (old_low, newer_mid, newest_high)}
    assert [ids[i] for i in order] == [newest_high, old_low, newer_mid]


def test_worker_sees_only_its_owners_jobs_unless_shared(app, live):
    alice = make_account(app, "alice@example.com")
    bob = make_account(app, "bob@example.com")
    shared = make_account(app, "ops@example.com", shared=True)
    submit(app, alice)
    assert ProtoWorker(live.url, bob.token).claim(max_jobs=5) == []
    assert len(ProtoWorker(live.url, alice.token).claim(max_jobs=5)) == 1
    submit(app, bob)
    assert len(ProtoWorker(live.url, shared.token).claim(max_jobs=5)) == 1


def test_worker_only_gets_models_it_advertises(app, account, live):
    submit(app, account, model="llama")
    worker = ProtoWorker(live.url, account.token)
    assert worker.claim(models=["echo"]) == []
    assert [j["model"] for j in worker.claim(models=["llama", "echo"])] == ["llama"]


# Waiters re-check the database only every WAKE_RECHECK (30 s here): answering within a few
# seconds is the bell's doing. The held-request budget shows when a poll has begun to wait.
BELLS_ONLY = {"WAKE_RECHECK": 30.0, "CLAIM_WAIT_MAX": 60.0}
WOKEN_WITHIN = 5.0  # far below WAKE_RECHECK, with room for a loaded 2-core machine


def polls_waiting(app, n: int, timeout: float = 30) -> None:
    """Wait until n long-polls hold a budget slot: each has read the queue and sleeps on its bells."""
    end = time.monotonic() + timeout
    with app.app_context():
        while budget.in_use()["long_polls"][0] != n:
            assert time.monotonic() < end, f"{n} long-poll(s) never began to wait"
            time.sleep(0.02)


def in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, list]:
    """Run fn in a thread; the list gets (its result, when it returned)."""
    out: list = []
    thread = threading.Thread(target=lambda: out.append((fn(*args, **kwargs), time.monotonic())), daemon=True)
    thread.start()
    return thread, out


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("app_config", [BELLS_ONLY])
def test_long_poll_wakes_on_the_jobs_bell_when_a_job_arrives(app, account, live):
    with app.app_context():
        settings.save({"max_long_polls": 5})  # so a waiting poll holds a slot we can see
    poll, out = in_thread(ProtoWorker(live.url, account.token).claim, wait=20)
    polls_waiting(app, 1)
    submitted = time.monotonic()
    submit(app, account)
    poll.join(timeout=30)
    claimed, returned = out[0]
    assert len(claimed) == 1
    assert returned - submitted < WOKEN_WITHIN


def test_long_poll_ends_empty_after_its_wait(app, account, live):
    worker = ProtoWorker(live.url, account.token)
    started = time.monotonic()
    assert worker.claim(wait=1) == []
    assert time.monotonic() - started >= 0.9


def claim_race(app, n_jobs=300, n_workers=50):
    """Let n_workers threads claim n_jobs concurrently; return how often each job was won."""
    account = make_account(app, f"race-{random.random()}@example.com", shared=False)
    ids = submit(app, account, n_jobs)
    with app.app_context():
        with jobs.db.read() as s:
            worker = s.scalar(select(Worker).where(Worker.user_id == account.user_id))
    wins: Counter = Counter()
    lock = threading.Lock()
    start = threading.Barrier(n_workers)
    failures: list[BaseException] = []

    def compete():
        try:
            with app.app_context():
                start.wait()
                while True:
                    got = jobs.claim_jobs(worker, ["echo"], random.randint(1, 4))
                    if not got:
                        with jobs.db.read() as s:
                            left = s.scalar(select(func.count()).select_from(Job).where(Job.state == "queued"))
                        if not left:
                            return
                    with lock:
                        wins.update(j.id for j in got)
        except BaseException as err:
            failures.append(err)

    threads = [threading.Thread(target=compete) for _ in range(n_workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not failures, failures
    with app.app_context(), jobs.db.read() as s:
        attempts = dict(s.execute(select(Job.id, Job.attempts).where(Job.id.in_(ids))).all())
    return ids, wins, attempts


@pytest.mark.parametrize("backend, claim_path", [("sqlite", "cas"), ("mariadb", "cas"), ("mariadb", "skip_locked")])
def test_claim_race_never_double_claims(request, tmp_path, backend, claim_path):
    from conftest import make_app

    if backend == "sqlite":
        url = f"sqlite:///{tmp_path}/race.db"
    else:
        url = request.getfixturevalue("mariadb").new_database()
    app = make_app(url, str(tmp_path / "i"), CLAIM_PATH=claim_path, DB_POOL_SIZE=60)
    with app.app_context():
        assert jobs.db.uses_skip_locked() is (claim_path == "skip_locked")
    ids, wins, attempts = claim_race(app)
    assert set(wins) == set(ids)
    assert max(wins.values()) == 1, "a job was claimed twice"
    assert set(attempts.values()) == {1}
    app.extensions["pollgate.engine"].dispose()


def test_retried_report_never_duplicates_or_reorders(app, account, live):
    job_id = submit(app, account)[0]
    worker = ProtoWorker(live.url, account.token)
    job = worker.claim()[0]
    deltas = [{"content": f"w{i} "} for i in range(6)]
    assert worker.report(job, deltas[:3], seq=0)["next_seq"] == 3
    # The same report again (its answer was lost), then one overlapping it.
    assert worker.report(job, deltas[:3], seq=0)["next_seq"] == 3
    assert worker.report(job, deltas[1:6], seq=1)["next_seq"] == 6
    assert chunk_rows(app, job_id) == [(i, d) for i, d in enumerate(deltas)]


def test_concurrent_duplicate_reports_store_each_chunk_once(app, account, live):
    job_id = submit(app, account)[0]
    worker = ProtoWorker(live.url, account.token)
    job = worker.claim()[0]
    body = {"jobs": [{"id": job["id"], "lease": job["lease"],
                      "chunks": [{"seq": i, "delta": {"content": str(i)}} for i in range(50)]}]}
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(worker.post("chunks", body).json())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(a["jobs"][0]["next_seq"] == 50 for a in answers)
    assert chunk_rows(app, job_id) == [(i, {"content": str(i)}) for i in range(50)]


def test_gap_in_sequence_asks_for_a_resend(app, account, live):
    job_id = submit(app, account)[0]
    worker = ProtoWorker(live.url, account.token)
    job = worker.claim()[0]
    answer = worker.report(job, [{"content": "a"}, {"content": "b"}], seq=0)
    answer = worker.report(job, [{"content": "d"}], seq=3)
    assert answer == {"id": job["id"], "ok": False, "next_seq": 2, "stop": False, "reason": "seq_gap"}
    worker.report(job, [{"content": "c"}, {"content": "d"}], seq=2, finish={"reason": "stop"})
    assert [d["content"] for _, d in chunk_rows(app, job_id)] == ["a", "b", "c", "d"]
    assert job_row(app, job_id).state == "completed"


def test_repeated_finish_is_answered_as_finished(app, account, live):
    submit(app, account)
    worker = ProtoWorker(live.url, account.token)
    job = worker.claim()[0]
    first = worker.report(job, [{"content": "x"}], finish={"reason": "stop"}, seq=0)
    again = worker.report(job, [{"content": "x"}], finish={"reason": "stop"}, seq=0)
    assert first["reason"] == again["reason"] == "finished"
    assert first["stop"] and again["stop"] and again["ok"]


def test_report_with_a_wrong_lease_or_worker_is_refused(app, account, live):
    job_id = submit(app, account)[0]
    worker = ProtoWorker(live.url, account.token)
    job = worker.claim()[0]
    forged = dict(job, lease="not-the-lease")
    assert worker.report(forged, [{"content": "x"}])["reason"] == "lease_lost"
    other = make_account(app, "mallory@example.com", shared=True)
    thief = ProtoWorker(live.url, other.token)
    assert thief.report(dict(job), [{"content": "x"}])["reason"] == "lease_lost"
    assert chunk_rows(app, job_id) == []


def test_expired_lease_requeues_a_silent_job_then_fails_it(app, account, live):
    job_id = submit(app, account)[0]
    worker = ProtoWorker(live.url, account.token)
    for attempt in (1, 2, 3):
        job = worker.claim(wait=5)[0]
        assert job["attempt"] == attempt
        time.sleep(2.2)  # LEASE_TTL is 2 s in tests
        with app.app_context():
            jobs.reap_expired()
    row = job_row(app, job_id)
    assert row.state == "failed" and row.error_code == "worker_lost"
    assert worker.report(job, [{"content": "late"}])["reason"] == "lease_lost"


def test_expired_lease_fails_a_job_that_already_streamed(app, account, live):
    job_id = submit(app, account)[0]
    worker = ProtoWorker(live.url, account.token)
    job = worker.claim()[0]
    worker.report(job, [{"content": "partial"}])
    time.sleep(2.2)
    with app.app_context():
        assert jobs.reap_expired()["failed"] == 1
    row = job_row(app, job_id)
    assert row.state == "failed" and row.attempts == 1
    assert "not repeated" in row.error_message


# Heartbeats 1 s apart keep a 3 s lease for 4 s: two seconds to spare for a busy machine.
@pytest.mark.parametrize("app_config", [{"LEASE_TTL": 3.0}])
def test_reports_renew_the_lease(app, account, live):
    job_id = submit(app, account)[0]
    worker = ProtoWorker(live.url, account.token)
    job = worker.claim()[0]
    for _ in range(4):
        time.sleep(1.0)
        worker.report(job)  # an empty report is a heartbeat
        with app.app_context():
            jobs.reap_expired()
    assert job_row(app, job_id).state == "running"


def test_release_requeues_unstreamed_and_fails_streamed(app, account, live):
    quiet_id, talky_id = submit(app, account, 2)
    worker = ProtoWorker(live.url, account.token)
    claimed = {j["id"]: j for j in worker.claim(max_jobs=2)}
    quiet = claimed[job_row(app, quiet_id).public_id]
    talky = claimed[job_row(app, talky_id).public_id]
    worker.report(talky, [{"content": "half"}])
    assert worker.release(quiet) == {"id": quiet["id"], "ok": True, "state": "queued"}
    assert worker.release(talky) == {"id": talky["id"], "ok": True, "state": "failed"}
    assert job_row(app, quiet_id).attempts == 0
    again = worker.claim()
    assert [j["id"] for j in again] == [quiet["id"]]


def test_cancelled_job_tells_its_worker_to_stop(app, account, live):
    job_id = submit(app, account)[0]
    worker = ProtoWorker(live.url, account.token)
    job = worker.claim()[0]
    worker.report(job, [{"content": "a"}])
    with app.app_context():
        assert jobs.cancel_job(job_id, "client_gone")
    answer = worker.report(job, [{"content": "b"}])
    assert answer["stop"] and answer["reason"] == "cancelled"
    assert chunk_rows(app, job_id) == [(0, {"content": "a"})]


@pytest.mark.parametrize("app_config", [{"JOB_TIMEOUT": 1.0}])
def test_job_past_its_deadline_stops_its_worker(app, account, live):
    job_id = submit(app, account)[0]
    worker = ProtoWorker(live.url, account.token)
    job = worker.claim()[0]
    time.sleep(1.1)
    answer = worker.report(job, [{"content": "late"}])
    assert answer["stop"] and answer["reason"] == "deadline"
    assert job_row(app, job_id).state == "expired"


def test_worker_error_with_retry_goes_to_another_attempt(app, account, live):
    job_id = submit(app, account)[0]
    worker = ProtoWorker(live.url, account.token)
    job = worker.claim()[0]
    worker.report(job, error={"code": "upstream_unavailable", "message": "down", "retry": True})
    assert job_row(app, job_id).state == "queued"
    job = worker.claim()[0]
    assert job["attempt"] == 2
    worker.report(job, [{"content": "ok"}], finish={"reason": "stop"})
    assert job_row(app, job_id).state == "completed"


@VALIDATION_ONLY
@pytest.mark.parametrize(
    "body, param",
    [
        ({}, "jobs"),
        ({"jobs": []}, "jobs"),
        ({"jobs": [{"id": "x"}]}, "jobs[0].lease"),
        ({"jobs": [{"id": "x", "lease": "y", "chunks": [{"seq": -1, "delta": {"content": "a"}}]}]}, "jobs[0].chunks[0].seq"),
        ({"jobs": [{"id": "x", "lease": "y", "chunks": [{"seq": 0, "delta": {"content": 5}}]}]}, "jobs[0].chunks[0].delta.content"),
        ({"jobs": [{"id": "x", "lease": "y", "chunks": [{"seq": 0, "delta": {"evil": "a"}}]}]}, "jobs[0].chunks[0].delta.evil"),
        ({"jobs": [{"id": "x", "lease": "y", "finish": {"reason": "bored"}}]}, "jobs[0].finish.reason"),
        ({"jobs": [{"id": "x", "lease": "y", "finish": {"usage": {"prompt_tokens": "3"}}}]}, "jobs[0].finish.usage.prompt_tokens"),
        ({"jobs": [{"id": "x", "lease": "y", "error": "bad"}]}, "jobs[0].error"),
    ],
)
def test_malformed_report_is_refused_whole(app, account, live, body, param):
    job_id = submit(app, account)[0]
    worker = ProtoWorker(live.url, account.token)
    job = worker.claim()[0]
    # A valid entry first: a malformed report must not store even that.
    good = {"id": job["id"], "lease": job["lease"], "chunks": [{"seq": 0, "delta": {"content": "a"}}]}
    if body.get("jobs"):
        body = {"jobs": [good, *body["jobs"]]}
        param = param.replace("jobs[0]", "jobs[1]")
    r = worker.post("chunks", body)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == param
    assert chunk_rows(app, job_id) == []


@pytest.mark.parametrize(
    "body, param",
    [({}, "models"), ({"models": []}, "models"), ({"models": ["a"], "max_jobs": 0}, "max_jobs"),
     ({"models": ["a"], "wait": -1}, "wait"), ({"models": [1]}, "models[0]")],
)
def test_malformed_claim_is_refused(app, account, live, body, param):
    r = ProtoWorker(live.url, account.token).post("claim", body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("app_config", [{"MAX_CHUNKS_PER_REPORT": 4}])
def test_a_report_with_too_many_chunks_is_refused_whole_with_413(app, account, live):
    ids = submit(app, account, 2)
    worker = ProtoWorker(live.url, account.token)
    a, b = worker.claim(max_jobs=2)

    def entry(job, n):
        chunks = [{"seq": i, "delta": {"content": "x"}} for i in range(n)]
        return {"id": job["id"], "lease": job["lease"], "chunks": chunks}

    # Counted over the whole report, not per job: 3 + 2 chunks is one too many.
    refused = worker.post("chunks", {"jobs": [entry(a, 3), entry(b, 2)]})
    assert refused.status_code == 413 and refused.json()["error"]["code"] == "request_too_large"
    assert [job_row(app, i).next_seq for i in ids] == [0, 0]  # nothing of it stored
    assert worker.post("chunks", {"jobs": [entry(a, 2), entry(b, 2)]}).status_code == 200
    assert [job_row(app, i).next_seq for i in ids] == [2, 2]


def test_worker_calls_need_a_valid_token(app, account, live):
    r = requests.post(f"{live.url}/worker/v1/claim", json={"models": ["a"]}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_token"
    r = requests.post(f"{live.url}/worker/v1/claim", json={"models": ["a"]}, timeout=10,
                      headers={"Authorization": "Bearer pgw_nope"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_worker_token"


def test_chunk_rows_match_next_seq(app, account, live):
    job_id = submit(app, account)[0]
    worker = ProtoWorker(live.url, account.token)
    job = worker.claim()[0]
    worker.say(job, "one two three", finish={"reason": "stop"})
    with app.app_context(), jobs.db.read() as s:
        count = s.scalar(select(func.count()).select_from(Chunk).where(Chunk.job_id == job_id))
    assert count == job_row(app, job_id).next_seq == 3


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("app_config", [BELLS_ONLY])
def test_newer_long_poll_retires_the_older_one(app, account, live):
    with app.app_context():
        settings.save({"max_long_polls": 5})
    old, new = ProtoWorker(live.url, account.token), ProtoWorker(live.url, account.token)
    holder, answers = in_thread(old.post, "claim", {"models": ["echo"], "max_jobs": 1, "wait": 20})
    polls_waiting(app, 1)
    # Its client "restarted" and polls anew: the worker's bell retires the old poll at once.
    started = time.monotonic()
    poll, claimed = in_thread(new.claim, wait=20)
    holder.join(timeout=30)
    answer, retired = answers[0]
    assert answer.json()["jobs"] == [] and answer.json()["superseded"] is True
    assert retired - started < WOKEN_WITHIN
    polls_waiting(app, 1)  # only the new one
    submitted = time.monotonic()
    submit(app, account)
    poll.join(timeout=30)
    assert len(claimed[0][0]) == 1  # the job went to the live poll, not the retired one
    assert claimed[0][1] - submitted < WOKEN_WITHIN


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("expected", [False, True])
def test_the_test_worker_raises_what_its_handler_hit_unless_told_to_expect_it(app, account, live, expected):
    def broken(worker, job):
        raise RuntimeError("a bug in the handler")

    [job_id] = submit(app, account)
    worker = WorkerThread(live.url, account.token, broken, expect_errors=expected)
    with contextlib.ExitStack() as raised:
        if not expected:
            raised.enter_context(pytest.raises(AssertionError, match="a bug in the handler"))
        with worker:
            end = time.monotonic() + 30
            while job_row(app, job_id).state != "running":
                assert time.monotonic() < end, "the job was never claimed"
                time.sleep(0.02)
    assert [str(e) for e in worker.errors] == ["a bug in the handler"]
