"""A chat request for n choices: n jobs, queued together, relayed one after the other by one held request.

Each choice is a job of its own, admitted and counted as a request (api.start_choices queues
all n or none). The request holds one held-request slot, carried by its first reader, and has
a reader per job, so the tailer keeps every job's reader expiry fresh while it waits. Choices
are relayed in order: choice 0 until it ends, then choice 1 (most likely over by then, so its
chunks come at once), and so on. A request for one choice never comes here.
"""
from __future__ import annotations

from typing import Any, Iterator

from flask import Response, current_app, stream_with_context

from . import relay, routing
from .completions import chunk_event, completion, sse, usage_event, usage_for
from .errors import ApiError, ClientGone
from .models import TERMINAL, Chunk, Job
from .relay import Reader, end_request

Answer = tuple[Job, list[dict[str, Any]]]  # a job relayed to its end, with every delta


def end_all(readers: list[Reader], answers: list[Answer], grace: float = 0.0) -> None:
    """End every reader of the request: those relayed to their end with their deltas, the rest stopped (or left
    `grace` seconds for a resume); the slot's reader last, so the slot outlives the others."""
    for i in reversed(range(len(readers))):
        ended = i < len(answers)
        end_request(readers[i], ended, answers[i][1] if ended else None, grace)


def relay_plain(readers: list[Reader]) -> list[Answer]:
    """Relay each choice's job to its end in turn and end the request; return every completed job with its
    deltas, or raise the error of the first choice that failed (the choices after it are cancelled)."""
    answers: list[Answer] = []
    try:
        for reader in readers:
            answers.append(relay.collect(reader))
            if answers[-1][0].state != "completed":
                break
    finally:
        end_all(readers, answers)
    if answers[-1][0].state != "completed":
        raise relay.job_error(answers[-1][0])
    return answers


def choices_completion(answers: list[Answer]) -> dict[str, Any]:
    """Build the one chat.completion of every choice: job 0's id, each choice at its index, the usage summed."""
    each = [completion(job, deltas) for job, deltas in answers]
    body = each[0]
    body["choices"] = [{**one["choices"][0], "index": i} for i, one in enumerate(each)]
    body["usage"] = summed_usage(answers)
    return body


def summed_usage(answers: list[Answer]) -> dict[str, int]:
    """Add up the usage of every choice: each was a request of its own."""
    counts = [usage_for(job, deltas) for job, deltas in answers]
    return {name: sum(c[name] for c in counts) for name in counts[0]}


def stream_response(readers: list[Reader], include_usage: bool) -> Response:
    """Start the choices' event stream once choice 0 has output (or HEARTBEAT_INTERVAL passed), or answer its error."""
    # As for one choice (api.stream_response): a worker that fails at once gives a real HTTP status.
    try:
        first = relay.wait_for_start(readers[0], current_app.config["HEARTBEAT_INTERVAL"])
    except BaseException:
        end_all(readers, [], current_app.config["RESUME_GRACE"])
        raise
    job = first[0]
    if job.state in TERMINAL and job.state != "completed" and job.next_seq == 0:
        end_all(readers, [(job, [])])
        raise relay.job_error(job)
    return Response(
        stream_with_context(sse_choices(readers, first, include_usage)),
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-cache, no-store", "X-Accel-Buffering": "no", "x-request-id": job.public_id,
                 **routing.served_headers(job)},
    )


def indexed(event: dict[str, Any], index: int) -> dict[str, Any]:
    """Put a one-choice chunk at its choice's index."""
    event["choices"][0]["index"] = index
    return event


def sse_choices(readers: list[Reader], first: tuple[Job, list[Chunk]], include_usage: bool) -> Iterator[str]:
    """Relay the choices as one OpenAI event stream: each choice's chunks and finish at its index, then one usage
    chunk summing them all, then [DONE]; a failed choice ends the stream with its error.

    Event ids count the stream's events, so they rise across choices. While choice 0 is
    relayed they are job 0's own ids (api.sse_stream), so a resume by id (retrieve.py,
    under job 0's id) picks up choice 0 alone: no later choice can be resumed.
    """
    head = first[0]  # every chunk names job 0: its id is the completion's
    answers: list[Answer] = []
    event_id = -1
    done = False
    try:
        for index, reader in enumerate(readers):
            event_id += 1
            # Inside the try, as for one choice: a client already gone fails this very first write.
            yield sse(indexed(chunk_event(head, {"role": "assistant", "content": ""}), index), event_id)
            deltas: list[dict[str, Any]] = []
            for kind, payload in relay.follow(reader, first if index == 0 else None):
                if kind == "chunks":
                    for chunk in payload:
                        deltas.append(chunk.delta)
                        event_id += 1
                        yield sse(indexed(chunk_event(head, chunk.delta), index), event_id)
                elif kind == "heartbeat":
                    yield ": keep-alive\n"  # no blank line: see api.sse_stream
                else:
                    answers.append((payload, deltas))
            job = answers[-1][0]
            event_id += 1
            if job.state != "completed":
                yield sse(relay.job_error(job).body(), event_id)
                break
            yield sse(indexed(chunk_event(head, {}, job.finish_reason or "stop"), index), event_id)
        else:
            if include_usage:
                event_id += 1
                yield sse({**usage_event(head, answers[0][1]), "usage": summed_usage(answers)}, event_id)
        done = True
        yield f"id: {event_id + 1}\ndata: [DONE]\n\n"
    except ApiError as err:
        # No worker in time, or the database gone past DB_OUTAGE_GRACE: say so and end cleanly.
        done = True
        yield sse(err.body(), event_id + 1)
        yield f"id: {event_id + 2}\ndata: [DONE]\n\n"
    except ClientGone:
        pass
    finally:
        # GeneratorExit (the client disconnected) lands here too: every job ends as one stream's
        # does, left RESUME_GRACE for a resume. A stream that ended cleanly stops the rest at once.
        end_all(readers, answers, 0.0 if done else current_app.config["RESUME_GRACE"])
