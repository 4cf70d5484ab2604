#!/usr/bin/env python3
"""strun serve through real clients: the `openai` package, curl and raw HTTP.

    python3 Tests/Clients/serve_clients.py SCENARIO STRUN PACKAGE

Each scenario starts `strun serve PACKAGE --port 0` itself (the system picks a free loopback
port, which the server prints), talks to it only over 127.0.0.1, stops it with SIGTERM and checks
that it exits 0. Every request has a timeout and every loop a bound. Exit status 0 means every
check passed; a failure prints what differed. Run by Tests/ToolTests/ServeCommandTests.swift.
"""
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

STRUN, PACKAGE = None, None
SYSTEM = "You are a helpful assistant."
QUESTION = "Who begat Enos?"


class Failure(Exception):
    pass


def check(condition, message):
    if not condition:
        raise Failure(message)


class Server:
    """`strun serve` on a free loopback port, stopped with SIGTERM."""

    def __init__(self, *extra, grace=None):
        args = [STRUN, "serve", PACKAGE, "--host", "127.0.0.1", "--port", "0", *extra]
        if grace is not None:
            args += ["--shutdown-grace", str(grace)]
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stderr = []
        threading.Thread(target=lambda: self.stderr.extend(self.process.stderr), daemon=True).start()
        deadline = time.monotonic() + 120
        line = ""
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line or "listening on" in line:
                break
        match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if not match:
            self.process.kill()
            raise Failure(f"the server did not say where it listens: {line!r} {''.join(self.stderr)}")
        self.port = int(match.group(1))
        self.url = f"http://127.0.0.1:{self.port}"
        # Serving once /health says so (the model loads after the server listens).
        for _ in range(600):
            status, _, _ = self.request("GET", "/health")
            if status == 200:
                break
            check(status == 503, f"/health answered {status} while loading")
            time.sleep(0.1)
        else:
            raise Failure("the model did not load within a minute")

    def request(self, method, path, body=None, headers=None, timeout=60):
        """One request on its own connection: (status, headers, body bytes)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
            all_headers = {"Content-Type": "application/json"}
            all_headers.update(headers or {})
            connection.request(method, path, body=body, headers=all_headers)
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def metrics(self, headers=None):
        status, _, body = self.request("GET", "/metrics", headers=headers)
        check(status == 200, f"/metrics answered {status}")
        values = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    def peak_rss_kib(self):
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        return 0

    def stop(self, timeout=60, signal_number=signal.SIGTERM):
        """SIGTERM (or SIGINT); the server must exit 0 within `timeout` seconds."""
        self.process.send_signal(signal_number)
        try:
            status = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise Failure(f"the server did not exit within {timeout} s of SIGTERM")
        check(status == 0, f"the server exited {status} after {signal.Signals(signal_number).name}: {''.join(self.stderr)}")

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        if self.process.poll() is None:
            if kind is None:
                self.stop()
            else:
                self.process.kill()
                self.process.wait()


def generate(*args):
    """`strun generate PACKAGE ARGS`: its text (the final newline dropped)."""
    result = subprocess.run([STRUN, "generate", PACKAGE, *args], capture_output=True, text=True, timeout=300)
    check(result.returncode == 0, f"strun generate failed: {result.stderr}")
    check(result.stdout.endswith("\n"), "strun generate's output does not end with a newline")
    return result.stdout[:-1]


def sse_events(raw):
    """The `data:` payloads of a server-sent event stream, checking its framing."""
    text = raw.decode()
    check(text.endswith("data: [DONE]\n\n"), f"the stream does not end with 'data: [DONE]': {text[-200:]!r}")
    events = text.split("\n\n")
    check(events[-1] == "", "the stream has bytes after its last event")
    payloads = []
    for event in events[:-1]:
        check(event.startswith("data: ") and "\n" not in event, f"not one data line: {event!r}")
        payloads.append(event[len("data: "):])
    check(payloads[-1] == "[DONE]" and "[DONE]" not in payloads[:-1], "[DONE] is not the last event alone")
    return [json.loads(p) for p in payloads[:-1]]


# MARK: Scenarios


def scenario_openai():
    """The openai package: models, chat (whole and streamed), completions, logprobs, stop
    strings, penalties and the prompt cache, each seeded request equal to `strun generate`."""
    import openai

    with Server("--parallel", "2") as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=120, max_retries=0)
        models = client.models.list().data
        name = os.path.splitext(os.path.basename(PACKAGE))[0]
        check([m.id for m in models] == [name], f"models: {[m.id for m in models]}")

        settings = ["--temperature", "0.8", "--top-p", "0.9", "--top-k", "30", "--seed", "7", "-n", "40"]
        expected = generate("-p", QUESTION, "--chat", *settings)
        check(len(expected) > 10, f"strun generate gave too little text: {expected!r}")
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
        sampling = dict(temperature=0.8, top_p=0.9, seed=7, max_tokens=40, extra_body={"top_k": 30})
        reply = client.chat.completions.create(model=name, messages=messages, **sampling)
        check(reply.object == "chat.completion", f"object {reply.object}")
        choice = reply.choices[0]
        check(choice.message.role == "assistant", "role")
        check(choice.message.content == expected, f"chat {choice.message.content!r} != strun generate {expected!r}")
        check(choice.finish_reason in ("stop", "length"), f"finish_reason {choice.finish_reason}")
        usage = reply.usage
        check(usage.prompt_tokens > 10 and usage.completion_tokens > 0, f"usage {usage}")
        check(usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, "total_tokens")

        # Streamed: the same text in deltas, then a usage chunk. The same prompt again: the prompt
        # cache holds all but its last token, and the seeded text is unchanged.
        pieces, finish, last_usage = [], None, None
        stream = client.chat.completions.create(
            model=name, messages=messages, stream=True, stream_options={"include_usage": True}, **sampling)
        for chunk in stream:
            check(chunk.object == "chat.completion.chunk", f"chunk object {chunk.object}")
            if chunk.usage is not None:
                last_usage = chunk.usage
            for c in chunk.choices:
                if c.delta.content:
                    pieces.append(c.delta.content)
                if c.finish_reason:
                    finish = c.finish_reason
        check("".join(pieces) == expected, f"streamed {''.join(pieces)!r} != {expected!r}")
        check(finish == choice.finish_reason, f"streamed finish {finish} != {choice.finish_reason}")
        check(last_usage is not None and last_usage.completion_tokens == usage.completion_tokens, f"stream usage {last_usage}")
        cached = last_usage.prompt_tokens_details.cached_tokens
        check(cached == usage.prompt_tokens - 1, f"cached tokens {cached}, expected {usage.prompt_tokens - 1}")

        # Completions, with OpenAI's penalties.
        expected = generate("-p", "And it came to pass", "--temperature", "0.7", "--seed", "3", "-n", "30",
                            "--frequency-penalty", "0.5", "--presence-penalty", "0.3", "--min-p", "0.05")
        text = client.completions.create(
            model=name, prompt="And it came to pass", temperature=0.7, seed=3, max_tokens=30, frequency_penalty=0.5,
            presence_penalty=0.3, extra_body={"min_p": 0.05})
        check(text.object == "text_completion", f"object {text.object}")
        check(text.choices[0].text == expected, f"completion {text.choices[0].text!r} != {expected!r}")
        check(text.choices[0].finish_reason == "length" or len(text.choices[0].text) < len(expected) + 1, "finish")
        streamed = "".join(
            c.choices[0].text for c in client.completions.create(
                model=name, prompt="And it came to pass", temperature=0.7, seed=3, max_tokens=30, frequency_penalty=0.5,
                presence_penalty=0.3, extra_body={"min_p": 0.05}, stream=True) if c.choices)
        check(streamed == expected, f"streamed completion {streamed!r} != {expected!r}")

        # Greedy with log-probabilities: each chosen token is the most likely one.
        greedy = client.chat.completions.create(
            model=name, messages=messages, temperature=0, max_tokens=12, logprobs=True, top_logprobs=3)
        content = greedy.choices[0].logprobs.content
        check(len(content) >= 1, "no logprobs")
        for entry in content:
            top = entry.top_logprobs
            check(len(top) == 3, f"{len(top)} alternatives")
            check(all(a.logprob >= b.logprob for a, b in zip(top, top[1:])), "alternatives out of order")
            check(abs(top[0].logprob - entry.logprob) < 1e-5 and top[0].token == entry.token, f"greedy token not the top: {entry}")
            check(entry.logprob <= 0 and bytes(entry.bytes).decode(errors="replace") == entry.token, f"entry {entry}")
        greedy_text = greedy.choices[0].message.content
        check(greedy_text == generate("-p", QUESTION, "--chat", "--temperature", "0", "-n", "12"), "greedy text")
        legacy = client.completions.create(model=name, prompt="And it came to pass", temperature=0, max_tokens=5, logprobs=2)
        lp = legacy.choices[0].logprobs
        check(len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset), "legacy logprobs")
        check("".join(lp.tokens) == legacy.choices[0].text, f"legacy tokens {lp.tokens} vs {legacy.choices[0].text!r}")

        # A stop string: the text ends before it.
        words = greedy_text.split()
        if len(words) >= 3:
            stop = words[2]
            stopped = client.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=12, stop=[stop, "zzz"])
            check(stopped.choices[0].finish_reason == "stop", f"stop finish {stopped.choices[0].finish_reason}")
            check(stopped.choices[0].message.content == greedy_text[:greedy_text.index(stop)],
                  f"stopped text {stopped.choices[0].message.content!r}")
        short = client.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=2)
        check(short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2, "max_tokens 2")

        # n > 1 is refused clearly.
        try:
            client.chat.completions.create(model=name, messages=messages, n=2, max_tokens=4)
            raise Failure("n=2 was accepted")
        except openai.BadRequestError as error:
            check(error.body.get("param") == "n", f"n=2: {error.body}")
        try:
            client.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=4)
            raise Failure("an unknown model was accepted")
        except openai.BadRequestError as error:
            check(error.body.get("code") == "model_not_found", f"unknown model: {error.body}")
    print("openai: models, chat (whole, streamed), completions, logprobs, stop, penalties, prompt cache, refusals: OK")


def scenario_chat_turns():
    """Five turns of one chat: each turn's prompt begins with the last one's, so the prompt
    cache holds all of it but what the template re-tokenises; without it nothing is cached."""
    import openai

    for cache in (True, False):
        extra = [] if cache else ["--no-prompt-cache"]
        with Server("--parallel", "2", *extra) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=120, max_retries=0)
            name = client.models.list().data[0].id
            messages = [{"role": "system", "content": SYSTEM}]
            previous = 0
            for turn, question in enumerate(["Who begat Enos?", "And then?", "Where did they dwell?", "What of Noah?",
                                             "Say it again."]):
                messages.append({"role": "user", "content": question})
                reply = client.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=24)
                cached = reply.usage.prompt_tokens_details.cached_tokens
                if not cache:
                    check(cached == 0, f"turn {turn + 1}: {cached} tokens cached with --no-prompt-cache")
                elif turn > 0:
                    check(cached >= previous, f"turn {turn + 1}: {cached} tokens cached of a previous prompt of {previous}")
                previous = reply.usage.prompt_tokens
                messages.append({"role": "assistant", "content": reply.choices[0].message.content})
    print("chat turns: five turns, each reusing the last one's prompt; none without the cache: OK")


def scenario_sse():
    """curl's raw bytes of a stream: headers, framing, chunk shapes, [DONE]."""
    with Server() as server:
        body = json.dumps({"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8, "seed": 1, "stream": True})
        result = subprocess.run(
            ["curl", "-sS", "-N", "-D", "-", "--max-time", "60", "-H", "Content-Type: application/json", "-d", body,
             server.url + "/v1/chat/completions"], capture_output=True, timeout=90)
        check(result.returncode == 0, f"curl failed: {result.stderr}")
        head, _, raw = result.stdout.partition(b"\r\n\r\n")
        head = head.decode().lower()
        check(head.startswith("http/1.1 200"), f"status line {head.splitlines()[0]}")
        check("content-type: text/event-stream" in head, f"headers {head}")
        check("transfer-encoding: chunked" in head, "not chunked")
        events = sse_events(raw)
        check(events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}, f"first chunk {events[0]}")
        ids = {e["id"] for e in events}
        check(len(ids) == 1 and ids.pop().startswith("chatcmpl-"), "chunk ids")
        check(all(e["object"] == "chat.completion.chunk" for e in events), "chunk objects")
        finishes = [e["choices"][0]["finish_reason"] for e in events]
        check(finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1]), f"finish reasons {finishes}")
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
        whole = json.loads(server.request("POST", "/v1/chat/completions", {
            "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 8, "seed": 1})[2])
        check(text == whole["choices"][0]["message"]["content"], f"streamed {text!r} != whole")
        # Completions stream the same way.
        result = subprocess.run(
            ["curl", "-sS", "-N", "--max-time", "60", "-d", json.dumps({"prompt": "And it came", "max_tokens": 5, "stream": True}),
             server.url + "/v1/completions"], capture_output=True, timeout=90)
        events = sse_events(result.stdout)
        check(all(e["object"] == "text_completion" for e in events), "completion chunk objects")
        check(events[-1]["choices"][0]["finish_reason"] == "length", "completion finish")
    print("sse: headers, framing, chunk shapes, [DONE], same text as whole: OK")


def error_shape(status, body, expected_status, param=None):
    check(status == expected_status, f"status {status}, expected {expected_status}: {body[:300]!r}")
    error = json.loads(body)["error"]
    check(set(error) == {"message", "type", "param", "code"}, f"error keys {set(error)}")
    check(isinstance(error["message"], str) and error["message"], "empty message")
    if param is not None:
        check(error["param"] == param, f"param {error['param']!r}, expected {param!r} ({error['message']})")
    return error


def scenario_bad_requests():
    """A table of bad requests: each gets its 4xx in OpenAI's error shape; the server goes on."""
    chat, completions = "/v1/chat/completions", "/v1/completions"
    ok = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    long_prompt = "And it came to pass " * 3000
    table = [
        ("malformed JSON", chat, b'{"messages": [', 400, None),
        ("not an object", chat, b"[1, 2]", 400, None),
        ("trailing garbage", chat, b'{"messages": []} x', 400, None),
        ("invalid UTF-8", chat, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, None),
        ("empty body", chat, b"", 400, None),
        ("missing messages", chat, {"max_tokens": 3}, 400, "messages"),
        ("empty messages", chat, {"messages": []}, 400, "messages"),
        ("messages not a list", chat, {"messages": "hi"}, 400, "messages"),
        ("message not an object", chat, {"messages": ["hi"]}, 400, "messages[0]"),
        ("missing role", chat, {"messages": [{"content": "hi"}]}, 400, "messages[0].role"),
        ("unknown role", chat, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
        ("content a number", chat, {"messages": [{"role": "user", "content": 3}]}, 400, "messages[0].content"),
        ("image content", chat, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400,
         "messages[0].content[0].type"),
        ("max_tokens 0", chat, {**ok, "max_tokens": 0}, 400, "max_tokens"),
        ("max_tokens negative", chat, {**ok, "max_tokens": -5}, 400, "max_tokens"),
        ("max_completion_tokens 0", chat, {**ok, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
        ("max_tokens a string", chat, {**ok, "max_tokens": "10"}, 400, "max_tokens"),
        ("max_tokens fractional", chat, {**ok, "max_tokens": 2.5}, 400, "max_tokens"),
        ("temperature a string", chat, {**ok, "temperature": "hot"}, 400, "temperature"),
        ("temperature 5", chat, {**ok, "temperature": 5}, 400, "temperature"),
        ("top_p 0", chat, {**ok, "top_p": 0}, 400, "top_p"),
        ("top_k negative", chat, {**ok, "top_k": -1}, 400, "top_k"),
        ("seed a string", chat, {**ok, "seed": "x"}, 400, "seed"),
        ("stop a number", chat, {**ok, "stop": 5}, 400, "stop"),
        ("stop list of numbers", chat, {**ok, "stop": ["a", 5]}, 400, "stop[1]"),
        ("stream a string", chat, {**ok, "stream": "yes"}, 400, "stream"),
        ("n 3", chat, {**ok, "n": 3}, 400, "n"),
        ("top_logprobs without logprobs", chat, {**ok, "top_logprobs": 2}, 400, "top_logprobs"),
        ("top_logprobs 50", chat, {**ok, "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs"),
        ("logit_bias bad key", chat, {**ok, "logit_bias": {"abc": 1}}, 400, "logit_bias"),
        ("unknown model", chat, {**ok, "model": "gpt-4o"}, 400, "model"),
        ("model a number", chat, {**ok, "model": 4}, 400, "model"),
        ("tools", chat, {**ok, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
        ("prompt longer than the context", completions, {"prompt": long_prompt, "max_tokens": 1}, 400, "prompt"),
        ("chat longer than the context", chat, {"messages": [{"role": "user", "content": long_prompt}]}, 400, "messages"),
        ("missing prompt", completions, {"max_tokens": 2}, 400, "prompt"),
        ("prompt a number", completions, {"prompt": 5}, 400, "prompt"),
        ("empty prompt", completions, {"prompt": ""}, 400, "prompt"),
        ("token id out of range", completions, {"prompt": [1, 2, 99999999]}, 400, "prompt[2]"),
        ("two prompts", completions, {"prompt": ["a", "b"]}, 400, "prompt"),
        ("echo", completions, {"prompt": "a", "echo": True}, 400, "echo"),
        ("tokenize without content", "/tokenize", {"text": "a"}, 400, "content"),
        ("detokenize bad ids", "/detokenize", {"tokens": [1, -2]}, 400, "tokens[1]"),
        ("detokenize strings", "/detokenize", {"tokens": "abc"}, 400, "tokens"),
    ]
    with Server("--max-body", "65536") as server:
        for name, path, body, status, param in table:
            got, headers, answer = server.request("POST", path, body)
            try:
                error_shape(got, answer, status, param)
            except Failure as failure:
                raise Failure(f"{name}: {failure}")
        # Too large a body: 413; no endpoint: 404; a wrong method: 4xx; all in the same shape.
        got, _, answer = server.request("POST", chat, b'{"messages": "' + b"a" * 70000 + b'"}')
        error_shape(got, answer, 413)
        got, _, answer = server.request("GET", "/v1/nothing")
        error_shape(got, answer, 404)
        got, _, answer = server.request("GET", chat)
        check(400 <= got < 500, f"GET {chat}: {got}")
        error_shape(got, answer, got)
        # Still serving, and the metrics counted the refusals.
        got, _, answer = server.request("POST", chat, ok)
        check(got == 200 and json.loads(answer)["choices"][0]["message"]["role"] == "assistant", f"after the table: {got}")
        metrics = server.metrics()
        refused = sum(v for k, v in metrics.items() if k.startswith("strun_requests_total") and 'status="400"' in k)
        check(refused == len(table), f"metrics count {refused} 400s of {len(table)}")
        tokens = json.loads(server.request("POST", "/tokenize", {"content": "And it came to pass", "with_pieces": True})[2])
        ids = [t["id"] for t in tokens["tokens"]]
        check("".join(t["piece"] for t in tokens["tokens"]) == "And it came to pass", f"pieces {tokens}")
        text = json.loads(server.request("POST", "/detokenize", {"tokens": ids})[2])["content"]
        check(text == "And it came to pass", f"detokenize {text!r}")
    print(f"bad requests: {len(table)} + 3 refused in OpenAI's shape, still serving, counted in /metrics; tokenize round trip: OK")


def scenario_api_key():
    """--api-key-file: every endpoint but /health needs the bearer key."""
    import openai

    key_file = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"strun-key-{os.getpid()}")
    with open(key_file, "w") as f:
        f.write("sk-local-test\n")
    try:
        with Server("--api-key-file", key_file) as server:
            check(server.request("GET", "/health")[0] == 200, "/health needs no key")
            status, headers, page = server.request("GET", "/")
            check(status == 200 and headers.get("Content-Type", "").startswith("text/html") and b"<html" in page, "the page needs no key")
            for path in ["/v1/models", "/metrics"]:
                error_shape(*server.request("GET", path)[::2], 401)
                error_shape(*server.request("GET", path, headers={"Authorization": "Bearer sk-local-tesT"})[::2], 401)
                error_shape(*server.request("GET", path, headers={"Authorization": "sk-local-test"})[::2], 401)
                check(server.request("GET", path, headers={"Authorization": "Bearer sk-local-test"})[0] == 200, f"{path} with the key")
            error_shape(*server.request("POST", "/v1/chat/completions", {"messages": []})[::2], 401)
            wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", timeout=60, max_retries=0)
            try:
                wrong.models.list()
                raise Failure("a wrong key was accepted")
            except openai.AuthenticationError:
                pass
            right = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-local-test", timeout=60, max_retries=0)
            reply = right.chat.completions.create(model=right.models.list().data[0].id,
                                                  messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
            check(reply.usage.completion_tokens >= 1, "with the key")
            server.stop(signal_number=signal.SIGINT)  # Ctrl-C stops it as SIGTERM does
    finally:
        os.remove(key_file)
    print("api key: 401 without, with a wrong or unprefixed key; /health open; openai client with the key; SIGINT exits 0: OK")


def scenario_load():
    """8 clients x 20 requests (half streamed) at --parallel 4 --queue 2, within a time limit: every
    answer is a complete response or a 503 with Retry-After; peak RSS stays bounded."""
    clients, per_client, limit = 8, 20, 240
    with Server("--parallel", "4", "--queue", "2") as server:
        results, lock = [], threading.Lock()
        deadline = time.monotonic() + limit

        def client(index):
            for i in range(per_client):
                if time.monotonic() > deadline:
                    with lock:
                        results.append(("timeout", index, i))
                    return
                stream = (index + i) % 2 == 0
                body = {"messages": [{"role": "user", "content": f"Request {index}-{i}: who begat Enos?"}],
                        "max_tokens": 8 + (i % 5) * 4, "seed": index * 100 + i, "stream": stream}
                try:
                    status, headers, answer = server.request("POST", "/v1/chat/completions", body, timeout=120)
                except Exception as error:  # noqa: BLE001 - recorded and failed below
                    with lock:
                        results.append(("exception", index, f"{error!r}"))
                    continue
                outcome = ("ok", index, body["max_tokens"])
                try:
                    if status == 503:
                        error = error_shape(status, answer, 503)
                        check(error["code"] == "queue_full", f"503 code {error['code']}")
                        check(headers.get("Retry-After") == "1", f"Retry-After {headers.get('Retry-After')}")
                        outcome = ("busy", index, i)
                    else:
                        check(status == 200, f"status {status}: {answer[:200]!r}")
                        if stream:
                            events = sse_events(answer)
                            finish = events[-1]["choices"][0]["finish_reason"]
                        else:
                            whole = json.loads(answer)
                            finish = whole["choices"][0]["finish_reason"]
                            usage = whole["usage"]
                            check(1 <= usage["completion_tokens"] <= body["max_tokens"], f"usage {usage}")
                        check(finish in ("stop", "length"), f"finish {finish}")
                except Failure as failure:
                    outcome = ("bad", index, str(failure))
                with lock:
                    results.append(outcome)

        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=limit + 60)
        took = time.monotonic() - start
        check(not any(t.is_alive() for t in threads), "clients still running past the limit")
        bad = [r for r in results if r[0] not in ("ok", "busy")]
        check(not bad, f"{len(bad)} bad answers, e.g. {bad[:3]}")
        ok = sum(1 for r in results if r[0] == "ok")
        busy = sum(1 for r in results if r[0] == "busy")
        check(ok + busy == clients * per_client, f"{ok} + {busy} answers of {clients * per_client}")
        check(ok >= clients * per_client // 4, f"only {ok} requests served")
        metrics = server.metrics()
        served = sum(v for k, v in metrics.items() if k.startswith("strun_requests_total") and "completions" in k and 'status="200"' in k)
        refused = sum(v for k, v in metrics.items() if k.startswith("strun_requests_total") and "completions" in k and 'status="503"' in k)
        check((served, refused) == (ok, busy), f"metrics {served} served, {refused} refused; clients saw {ok}, {busy}")
        check(metrics["strun_active_sequences"] == 0 and metrics["strun_queue_depth"] == 0, "sequences still held")
        rss = server.peak_rss_kib()
        bound = int(os.environ.get("STRUN_SERVE_RSS_BOUND_MIB", "256"))
        check(0 < rss < bound * 1024, f"peak RSS {rss // 1024} MiB over {bound} MiB")
    print(f"load: {clients} clients x {per_client} requests in {took:.1f} s: {ok} served, {busy} refused with 503 "
          f"(queue full), peak RSS {rss // 1024} MiB: OK")


def wait_for(server, name, value, what):
    for _ in range(100):
        if server.metrics()[name] == value:
            return
        time.sleep(0.05)
    raise Failure(f"{what} within 5 s ({name} is {server.metrics()[name]}, not {value})")


def scenario_disconnect():
    """A client killed mid-stream frees its sequence at the next step; so does one killed while
    waiting for a whole (not streamed) answer, and one killed while its request waits in the queue."""
    with Server("--parallel", "2") as server:
        body = json.dumps({"prompt": "And it came to pass", "max_tokens": 3000, "ignore_eos": True, "stream": True})
        curl = subprocess.Popen(["curl", "-sS", "-N", "--max-time", "120", "-d", body, server.url + "/v1/completions"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        received = b""
        while received.count(b"data: ") < 5:
            line = curl.stdout.readline()
            check(line, "the stream ended early")
            received += line
        check(server.metrics()["strun_active_sequences"] == 1, "the stream holds no sequence")
        curl.kill()
        curl.wait()
        for _ in range(100):
            if server.metrics()["strun_active_sequences"] == 0:
                break
            time.sleep(0.05)
        else:
            raise Failure("the sequence of a killed client was not freed within 5 s")
        check(server.metrics()["strun_generated_tokens_total"] < 3000, "the generation ran to its end")
        status, _, _ = server.request("POST", "/v1/completions", {"prompt": "And", "max_tokens": 2})
        check(status == 200, "serving after the disconnect")

        # Not streamed: nothing is written before the end, so only the closed connection tells.
        def long_request(stream):
            body = json.dumps({"prompt": "And it came to pass", "max_tokens": 3000, "ignore_eos": True, "stream": stream})
            return subprocess.Popen(["curl", "-sS", "-N", "--max-time", "120", "-d", body, server.url + "/v1/completions"],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        before = server.metrics()["strun_generated_tokens_total"]
        whole = long_request(False)
        wait_for(server, "strun_active_sequences", 1, "the whole request did not start")
        time.sleep(0.5)
        whole.kill()
        whole.wait()
        wait_for(server, "strun_active_sequences", 0, "the sequence of a killed client waiting for a whole answer was not freed")
        check(server.metrics()["strun_generated_tokens_total"] - before < 3000, "the whole generation ran to its end")

    # Waiting in the queue: the request leaves it.
    with Server("--parallel", "1") as server:
        body = json.dumps({"prompt": "And it came to pass", "max_tokens": 3000, "ignore_eos": True, "stream": True})
        running = subprocess.Popen(["curl", "-sS", "-N", "--max-time", "120", "-d", body, server.url + "/v1/completions"],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        wait_for(server, "strun_active_sequences", 1, "the first request did not start")
        queued = subprocess.Popen(["curl", "-sS", "-N", "--max-time", "120", "-d", body, server.url + "/v1/completions"],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        wait_for(server, "strun_queue_depth", 1, "the second request did not wait")
        queued.kill()
        queued.wait()
        wait_for(server, "strun_queue_depth", 0, "a killed client's request stayed in the queue")
        running.kill()
        running.wait()
        wait_for(server, "strun_active_sequences", 0, "the running request's sequence was not freed")
    print("disconnect: a killed client's sequence freed within 5 s, streamed, whole or queued: OK")


def scenario_sigterm():
    """SIGTERM during streams: short ones finish within the grace period, long ones are cut with
    an error event and [DONE]; new connections are refused; the server exits 0."""
    with Server("--parallel", "3", grace=2) as server:
        outputs = {}

        def stream(name, tokens):
            body = json.dumps({"prompt": "And it came to pass", "max_tokens": tokens, "ignore_eos": True, "stream": True})
            result = subprocess.run(["curl", "-sS", "-N", "--max-time", "60", "-d", body, server.url + "/v1/completions"],
                                    capture_output=True, timeout=90)
            outputs[name] = result

        threads = [threading.Thread(target=stream, args=("long", 3000)), threading.Thread(target=stream, args=("short", 40))]
        for t in threads:
            t.start()
        for _ in range(200):
            if server.metrics()["strun_active_sequences"] == 2:
                break
            time.sleep(0.05)
        check(server.metrics()["strun_active_sequences"] == 2, "the two streams did not start")
        start = time.monotonic()
        server.stop(timeout=30)
        took = time.monotonic() - start
        for t in threads:
            t.join(timeout=60)
        check(outputs["long"].returncode == 0 and outputs["short"].returncode == 0, "curl failed")
        short = sse_events(outputs["short"].stdout)
        check(short[-1]["choices"][0]["finish_reason"] == "length", f"short stream: {short[-1]}")
        long = sse_events(outputs["long"].stdout)
        check(long[-1].get("error", {}).get("code") == "shutting_down", f"long stream's last event: {long[-1]}")
        check(took < 20, f"exit took {took:.1f} s")
    print(f"sigterm: a short stream finished, a long one cut with an error event and [DONE], exit 0 in {took:.1f} s: OK")


def main():
    global STRUN, PACKAGE
    scenario, STRUN, PACKAGE = sys.argv[1], sys.argv[2], sys.argv[3]
    scenarios = {name[len("scenario_"):]: f for name, f in globals().items() if name.startswith("scenario_")}
    if scenario not in scenarios:
        sys.exit(f"unknown scenario {scenario}; one of {', '.join(scenarios)}")
    try:
        scenarios[scenario]()
    except Failure as failure:
        print(f"{scenario}: FAILED: {failure}")
        sys.exit(1)


if __name__ == "__main__":
    main()
