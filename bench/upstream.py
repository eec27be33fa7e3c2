"""The bench's model server: a small, fast OpenAI-compatible endpoint on 127.0.0.1.

    python bench/upstream.py --port 9000

It answers every gateway in the side-by-side run alike, so the gateways are what differ.
It is asyncio on one thread with keep-alive connections, so it serves thousands of
requests a second and is not the bottleneck (the bench measures it directly as the
floor). POST /v1/chat/completions answers any model with ANSWER, streamed as one SSE
event per word or as one JSON body; `"stream_options": {"include_usage": true}` adds the
usage chunk. A model named `think-S-N` waits S seconds, then streams N words THINK_GAP
apart, as a slow model does (the held-stream ladder). GET /v1/models lists `bench-chat`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time

ANSWER = "Pollgate and its rivals relay this answer word by word to the bench"
WORDS = ANSWER.split(" ")
THINK_GAP = 0.3  # seconds between a think- model's words: think-8-40 lasts 8 + 12 = 20 s
# OpenAI's own streams send no Content-Length and end with the terminating chunk.
STREAM_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
               b"transfer-encoding: chunked\r\n\r\n")


def completion(model: str, created: int) -> dict:
    """Build the whole JSON answer of a non-streamed request."""
    return {"id": "chatcmpl-bench", "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 8, "completion_tokens": len(WORDS), "total_tokens": 8 + len(WORDS)}}


def event(model: str, created: int, delta: dict, finish: str | None = None, usage: dict | None = None) -> bytes:
    """Encode one SSE event as one HTTP chunk."""
    body = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage:
        body["usage"] = usage
    return chunk(b"data: " + json.dumps(body).encode() + b"\n\n")


def chunk(data: bytes) -> bytes:
    """Frame bytes as one piece of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def plan(model: str) -> tuple[float, list[str], float]:
    """Return (seconds before the first word, the words, seconds between words) for a model name."""
    if model.startswith("think-"):
        try:
            _, wait, count = model.split("-")
            return float(wait), [f"w{i} " for i in range(int(count))], THINK_GAP
        except ValueError:
            pass
    return 0.0, [w + " " for w in WORDS[:-1]] + [WORDS[-1]], 0.0


async def answer_chat(writer: asyncio.StreamWriter, body: dict) -> None:
    """Answer one chat request, streamed or whole."""
    model, created = str(body.get("model", "bench-chat")), int(time.time())
    wait, words, gap = plan(model)
    if wait:
        await asyncio.sleep(wait)
    if not body.get("stream"):
        data = json.dumps(completion(model, created)).encode()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                     % (len(data), data))
        return
    writer.write(STREAM_HEAD + event(model, created, {"role": "assistant", "content": ""}))
    for word in words:
        if gap:
            await writer.drain()
            await asyncio.sleep(gap)
        writer.write(event(model, created, {"content": word}))
    writer.write(event(model, created, {}, "stop"))
    if (body.get("stream_options") or {}).get("include_usage"):
        usage = {"prompt_tokens": 8, "completion_tokens": len(words), "total_tokens": 8 + len(words)}
        writer.write(event(model, created, {}, usage=usage))
    writer.write(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Serve requests on one keep-alive connection until the peer closes it."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path = lines[0].split(" ")[:2]
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
            raw = await reader.readexactly(int(headers.get("content-length", "0")))
            if method == "POST" and path.endswith("/chat/completions"):
                await answer_chat(writer, json.loads(raw or b"{}"))
            elif method == "GET" and path.endswith("/models"):
                data = json.dumps({"object": "list", "data": [
                    {"id": "bench-chat", "object": "model", "created": 0, "owned_by": "bench"}]}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                             % (len(data), data))
            else:
                writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def main(port: int) -> None:
    """Listen on 127.0.0.1:port until killed."""
    server = await asyncio.start_server(serve, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="The bench's fast OpenAI-compatible model server.")
    p.add_argument("--port", type=int, required=True)
    asyncio.run(main(p.parse_args().port))
