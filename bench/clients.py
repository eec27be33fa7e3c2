"""Load generator process: threads that send chat requests with the openai client until a deadline.

Run by load.py and versus.py, several at once, so the client side is not one GIL-bound process:
    python bench/clients.py --base URL --threads 20 --start-at EPOCH --stop-at EPOCH --out FILE
        [--model echo] [--no-stream]
The API key comes in BENCH_API_KEY. Writes one JSON record per request.
"""
from __future__ import annotations

import argparse
import json
import os
import threading
import time
from typing import Any

from openai import OpenAI

PROMPT = "the quick brown fox jumps"  # five words: the echo worker streams five deltas


def one_request(client: OpenAI, model: str, stream: bool) -> dict[str, Any]:
    """Send one request; return its start, first content, end, chunk count and error."""
    record: dict[str, Any] = {"start": time.time(), "first": None, "end": None, "chunks": 0, "error": None,
                              "id": None}
    try:
        if not stream:
            answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}])
            if not answer.choices[0].message.content:
                raise RuntimeError("an answer without content")
            record.update(first=time.time(), chunks=1, id=answer.id)
            record["end"] = record["first"]
            return record
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": PROMPT}], stream=True
        )
        with stream:
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    record["chunks"] += 1
                    record["first"] = record["first"] or time.time()
                    record["id"] = chunk.id
    except Exception as err:  # counted, not raised: the figure is the error count
        record["error"] = f"{type(err).__name__}: {str(err)[:120]}"
    record["end"] = time.time()
    return record


def loop(client: OpenAI, args: argparse.Namespace, out: list[dict[str, Any]]) -> None:
    """Issue requests back to back from start_at until stop_at."""
    time.sleep(max(0.0, args.start_at - time.time()))
    while time.time() < args.stop_at:
        out.append(one_request(client, args.model, args.stream))


def main() -> None:
    """Run the threads and write their records."""
    p = argparse.ArgumentParser()
    p.add_argument("--base", required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--start-at", type=float, required=True)
    p.add_argument("--stop-at", type=float, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="echo")
    p.add_argument("--no-stream", dest="stream", action="store_false")
    args = p.parse_args()
    client = OpenAI(base_url=args.base + "/v1", api_key=os.environ["BENCH_API_KEY"], max_retries=0, timeout=60)
    records: list[dict[str, Any]] = []
    threads = [threading.Thread(target=loop, args=(client, args, records), daemon=True)
               for _ in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=args.stop_at - time.time() + 90)
    with open(args.out, "w") as f:
        json.dump(records, f)


if __name__ == "__main__":
    main()
