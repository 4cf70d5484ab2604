#!/usr/bin/env python3
"""A load generator for OpenAI-compatible servers: CLIENTS threads, each sending REQUESTS streamed
chat requests one after another (each its own prompt, greedy, `ignore_eos` so every reply has
exactly MAX_TOKENS tokens), all against one server on loopback. Prints one JSON object:
aggregate generated tokens/s over the whole run, median and p95 time to first token, median
inter-token latency, and each request's decode rate (tokens after the first over the time since
the first). Used by serve_llama.sh for strun serve and llama-server alike.

    python3 Benchmarks/serve_load.py URL --clients 4 --requests 3 --max-tokens 64 [--model NAME]

With --chat-turns N it instead holds one conversation of N turns (each user message a passage,
each reply MAX_TOKENS tokens, sent back as history) and prints each turn's prompt tokens and
time to first token: what a prompt cache saves on the next turn of a chat.
"""
import argparse
import http.client
import json
import statistics
import sys
import threading
import time
import urllib.parse

PASSAGE = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; and darkness "
           "was upon the face of the deep. And the Spirit of God moved upon the face of the waters. And God said, Let there "
           "be light: and there was light. And God saw the light, that it was good: and God divided the light from the "
           "darkness. Tell me, in your own words, what happened next, and why.")


def one_request(url, body, timeout):
    """Sends one streamed chat request; returns (send time, content chunk times, generated tokens)."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    sent = time.monotonic()
    connection.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"status {response.status}: {response.read()[:300]!r}")
    times, tokens, done = [], None, False
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            done = True
            break
        chunk = json.loads(data)
        if "error" in chunk:
            raise RuntimeError(f"error event: {chunk['error']}")
        for choice in chunk.get("choices", []):
            if choice.get("delta", {}).get("content"):
                times.append(time.monotonic())
        usage = chunk.get("usage")
        if usage:
            tokens = usage.get("completion_tokens")
        elif chunk.get("timings", {}).get("predicted_n") and tokens is None:
            tokens = chunk["timings"]["predicted_n"]
    connection.close()
    if not done:
        raise RuntimeError("the stream ended without [DONE]")
    return sent, times, tokens if tokens is not None else len(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--model", default=None)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--chat-turns", type=int, default=0)
    args = parser.parse_args()
    if args.chat_turns:
        return chat_turns(args)

    results, errors, lock = [], [], threading.Lock()

    def client(index):
        for i in range(args.requests):
            body = {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                                 {"role": "user", "content": f"Request {index}.{i}. {PASSAGE}"}],
                    "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            if args.model:
                body["model"] = args.model
            try:
                result = one_request(args.url, body, args.timeout)
            except Exception as error:  # noqa: BLE001 - reported below
                with lock:
                    errors.append(f"{error!r}")
                return
            with lock:
                results.append(result)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    end = time.monotonic()
    if errors or not results:
        print(json.dumps({"error": errors[:3] or ["no results"]}))
        sys.exit(1)
    ttft = sorted(times[0] - sent for sent, times, _ in results if times)
    gaps = [b - a for _, times, _ in results for a, b in zip(times, times[1:])]
    decode = [(n - 1) / (times[-1] - times[0]) for _, times, n in results if len(times) > 1 and times[-1] > times[0]]
    tokens = sum(n for _, _, n in results)
    print(json.dumps({
        "clients": args.clients, "requests": len(results), "generated_tokens": tokens, "seconds": end - start,
        "aggregate_tokens_per_second": tokens / (end - start),
        "ttft_median_ms": 1000 * statistics.median(ttft), "ttft_p95_ms": 1000 * ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))],
        "itl_median_ms": 1000 * statistics.median(gaps) if gaps else None,
        "decode_tokens_per_second_median": statistics.median(decode) if decode else None,
    }))


def chat_turns(args):
    messages, turns = [{"role": "system", "content": "You are a helpful assistant."}], []
    for turn in range(args.chat_turns):
        messages.append({"role": "user", "content": f"Turn {turn + 1}. {PASSAGE}"})
        body = {"messages": messages, "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        parts = urllib.parse.urlsplit(args.url)
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=args.timeout)
        sent = time.monotonic()
        connection.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        first, text, usage = None, "", {}
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            for choice in chunk.get("choices", []):
                content = choice.get("delta", {}).get("content")
                if content:
                    first = first or time.monotonic()
                    text += content
            usage = chunk.get("usage") or usage
        connection.close()
        messages.append({"role": "assistant", "content": text})
        turns.append({"turn": turn + 1, "prompt_tokens": usage.get("prompt_tokens"),
                      "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
                      "ttft_ms": 1000 * (first - sent) if first else None})
    print(json.dumps({"turns": turns}))


if __name__ == "__main__":
    main()
