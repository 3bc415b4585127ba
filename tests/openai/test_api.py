"""The OpenAI-compatible API of `expertmesh up` (tiny-maverick, 2 expert workers), driven
by the official `openai` Python client, plus raw HTTP for what the client cannot send; and
`up` with no `--model` answering the README's question with the demo model."""

import base64
import http.server
import json
import math
import os
import struct
import zlib
import re
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("EXPERTMESH_BIN", str(ROOT / "target" / "debug" / "expertmesh"))
REFERENCE = json.loads((ROOT / "tests/fixtures/tiny-maverick/reference.json").read_text())
CASES = {c["name"]: c for c in REFERENCE["cases"]}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(*extra, model="tests/fixtures/tiny-maverick"):
    """`up` on `model` (None: the default, the demo model), unless `extra` names one."""
    if model is not None and "--model" not in extra:
        extra = ("--model", model, *extra)
    port = free_port()
    proc = subprocess.Popen(
        [BIN, "up", "--http", f"127.0.0.1:{port}", *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, "expertmesh up exited"
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, base
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("the cluster did not become healthy")


@pytest.fixture(scope="module")
def server():
    proc, base = start_cluster()
    yield base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


def raw(base, path, body, headers=None):
    req = urllib.request.Request(base + path, data=body, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def metric(base, name):
    text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-maverick"]


def test_chat_completion(client):
    r = client.chat.completions.create(
        model="tiny-maverick", messages=[{"role": "user", "content": "How many experts?"}],
        max_tokens=8, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_chat_equals_unstreamed(client):
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "How many experts does Maverick have?"}]
    whole = client.chat.completions.create(model="tiny-maverick", messages=messages,
                                           max_tokens=12, temperature=0)
    stream = client.chat.completions.create(model="tiny-maverick", messages=messages,
                                            max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            finish = c.finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens
    # The chat case of the fixture: the template renders the same prompt as transformers.
    assert whole.usage.prompt_tokens == len(CASES["chat"]["input_ids"])


def test_token_id_prompt_at_temperature_zero_matches_the_reference(client):
    case = CASES["short"]
    n = len(case["greedy_new_ids"])
    r = client.completions.create(model="tiny-maverick", prompt=case["input_ids"],
                                  max_tokens=n, temperature=0)
    assert r.choices[0].text == case["decoded_greedy_text"]
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(case["input_ids"])
    assert r.usage.completion_tokens == n


def test_text_prompt_tokenizes_like_transformers(client):
    case = CASES["short"]
    r = client.completions.create(model="tiny-maverick", prompt=case["prompt"],
                                  max_tokens=len(case["greedy_new_ids"]), temperature=0)
    assert r.usage.prompt_tokens == len(case["input_ids"])
    assert r.choices[0].text == case["decoded_greedy_text"]


def test_stop_strings(client):
    case = CASES["short"]  # greedy text: "artbeats whil whil whil coordinator..."
    r = client.completions.create(model="tiny-maverick", prompt=case["input_ids"],
                                  max_tokens=12, temperature=0, stop=[" whil"])
    assert r.choices[0].text == "artbeats"
    assert r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny-maverick", prompt=case["input_ids"],
                                         max_tokens=12, temperature=0, stop=[" whil"],
                                         stream=True)
    text = "".join(c.choices[0].text for c in streamed if c.choices)
    assert text == "artbeats"


def test_stop_token_ids_and_token_ids(server):
    case = CASES["short"]
    body = {"prompt": case["input_ids"], "max_tokens": 8, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    status, r = raw(server, "/v1/completions", json.dumps(body).encode())
    assert status == 200, r
    ids = r["choices"][0]["token_ids"]
    assert ids == case["greedy_new_ids"][:len(ids)] and len(ids) == 8
    k = ids.index(ids[2])
    status, r = raw(server, "/v1/completions",
                    json.dumps({**body, "stop_token_ids": [ids[2]]}).encode())
    assert status == 200, r
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["choices"][0]["token_ids"] == ids[:k + 1]
    # min_tokens bars the stop ids until that many tokens are out.
    status, r = raw(server, "/v1/completions",
                    json.dumps({**body, "stop_token_ids": [ids[2]], "min_tokens": 8}).encode())
    assert status == 200, r
    assert r["choices"][0]["finish_reason"] == "length"
    assert len(r["choices"][0]["token_ids"]) == 8 and ids[2] not in r["choices"][0]["token_ids"]


def test_tokenize_and_detokenize_like_vllm(server):
    status, r = raw(server, "/tokenize", json.dumps({"prompt": "How many experts?"}).encode())
    assert status == 200, r
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == 4096
    status, back = raw(server, "/detokenize", json.dumps({"tokens": r["tokens"]}).encode())
    assert status == 200 and back["prompt"].endswith("How many experts?"), back
    chat = {"messages": [{"role": "user", "content": "How many experts?"}]}
    status, t = raw(server, "/v1/tokenize", json.dumps(chat).encode())
    assert status == 200, t
    # The count is what a chat completion of the same messages reports as its prompt.
    status, c = raw(server, "/v1/chat/completions", json.dumps({**chat, "max_tokens": 1}).encode())
    assert status == 200 and c["usage"]["prompt_tokens"] == t["count"], (t, c)
    status, bad = raw(server, "/detokenize", json.dumps({"tokens": [10**7]}).encode())
    assert status == 400 and bad["error"]["param"] == "tokens"


def test_messages_are_validated_like_vllm(client, server):
    cases = [
        ([{"role": "hacker", "content": "hi"}], "messages[0].role"),
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "user", "content": {"text": "hi"}}], "messages[0]"),
    ]
    for messages, param in cases:
        status, payload = raw(server, "/v1/chat/completions",
                              json.dumps({"messages": messages, "max_tokens": 2}).encode())
        assert status == 400 and payload["error"]["param"] == param, (messages, payload)
    r = client.chat.completions.create(
        model="tiny-maverick", max_tokens=2, user="u-1",
        messages=[{"role": "developer", "content": "Be brief."},
                  {"role": "user", "content": "hi"}])
    assert r.choices[0].finish_reason in ("stop", "length")
    assert client.models.list().data[0].model_extra["max_model_len"] == 4096


def test_concurrent_requests_equal_their_runs_alone(client, server):
    prompts = [CASES["long"]["input_ids"][: 1 + (i * 29) % 84] for i in range(32)]
    lengths = [2 + i % 11 for i in range(32)]

    def run(i):
        r = client.completions.create(model="tiny-maverick", prompt=prompts[i],
                                      max_tokens=lengths[i], temperature=0)
        return r.choices[0].text, r.usage.completion_tokens

    alone = [run(i) for i in range(32)]
    time.sleep(2.5)  # let the worker's next heartbeat carry its step count
    steps_before = metric(server, "expertmesh_scheduler_steps_total")
    results = [None] * 32

    def worker(i):
        results[i] = run(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone
    time.sleep(2.5)
    steps = metric(server, "expertmesh_scheduler_steps_total") - steps_before
    tokens = sum(n for _, n in alone)
    # Alone, every generated token takes its own step; shared, far fewer steps are needed.
    assert 0 < steps < tokens / 2, (steps, tokens)


def test_bad_requests_get_openai_errors_and_the_server_stays_healthy(client, server):
    cases = [
        (b"{not json", 400),
        (json.dumps({"prompt": 5}).encode(), 400),
        (json.dumps({"prompt": "x", "max_tokens": "ten"}).encode(), 400),
        (json.dumps({"prompt": "x", "max_tokens": 0}).encode(), 400),
        (json.dumps({"prompt": "x", "max_tokens": 10**6}).encode(), 400),
        (json.dumps({"prompt": "x", "model": "no-such-model"}).encode(), 404),
        (json.dumps({"prompt": [999999]}).encode(), 400),
        (b"{" + b" " * (33 * 1024 * 1024) + b"}", 413),
    ]
    for body, code in cases:
        status, payload = raw(server, "/v1/completions", body)
        assert status == code, (body[:60], status, payload)
        assert set(payload["error"]) >= {"message", "type", "param", "code"}
    status, payload = raw(server, "/v1/chat/completions", json.dumps({"messages": []}).encode())
    assert status == 400 and payload["error"]["param"] == "messages"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-maverick", messages=[], max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=4)
    with urllib.request.urlopen(server + "/health", timeout=10) as r:
        assert r.status == 200
    r = client.completions.create(model="tiny-maverick", prompt="x", max_tokens=2)
    assert r.usage.completion_tokens >= 1


def test_metrics_count_requests_and_tokens(client, server):
    before = metric(server, "expertmesh_completion_tokens_total")
    client.completions.create(model="tiny-maverick", prompt="x", max_tokens=3, temperature=0)
    assert metric(server, "expertmesh_completion_tokens_total") >= before + 1
    text = urllib.request.urlopen(server + "/metrics", timeout=10).read().decode()
    for name in ["expertmesh_requests_total", "expertmesh_time_to_first_token_seconds_bucket",
                 "expertmesh_inter_token_latency_seconds_count", "expertmesh_queue_depth",
                 "expertmesh_kv_blocks_used", "expertmesh_routed_tokens_total",
                 "expertmesh_dispatch_round_trip_seconds_count"]:
        assert name in text, name


def test_api_key_is_required_when_set():
    proc, base = start_cluster("--api-key", "sekret")
    try:
        bad = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model="tiny-maverick", prompt="x", max_tokens=2)
        good = openai.OpenAI(base_url=base + "/v1", api_key="sekret", max_retries=0)
        assert good.completions.create(model="tiny-maverick", prompt="x", max_tokens=2).choices
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_client_that_disconnects_cancels_its_request(server):
    host, port = server.removeprefix("http://").split(":")
    body = json.dumps({"prompt": [697, 318], "max_tokens": 3000, "temperature": 0,
                       "stream": True}).encode()
    s = socket.create_connection((host, int(port)), timeout=30)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    got = b""
    while b"data: " not in got:  # generation is under way once an event arrives
        chunk = s.recv(65536)
        assert chunk, "the server closed the stream"
        got += chunk
    s.close()
    deadline = time.time() + 20
    while time.time() < deadline:
        time.sleep(0.5)
        if metric(server, "expertmesh_running_sequences") == 0 \
                and metric(server, "expertmesh_kv_blocks_used") == 0:
            break
    else:
        raise AssertionError("the request kept running after its client left")
    # It stopped long before its 3000 tokens.
    assert metric(server, "expertmesh_completion_tokens_total") < 2500


def test_health_is_503_and_requests_fail_cleanly_without_workers():
    port = free_port()
    proc = subprocess.Popen([BIN, "coordinator", "--listen", "127.0.0.1:0", "--http",
                             f"127.0.0.1:{port}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                raise AssertionError("healthy without workers")
            except urllib.error.HTTPError as e:
                assert e.code == 503
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.time() < deadline
                time.sleep(0.1)
        status, payload = raw(base, "/v1/completions", json.dumps({"prompt": "x"}).encode())
        assert status == 503 and payload["error"]["type"] == "server_error"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ---- images -------------------------------------------------------------------------------

IMAGE = ROOT / "tests/fixtures/tiny-maverick/test-image.png"
IMAGE_PROMPT = CASES["image"]["messages"][0]["content"][1]["text"]  # "What is in this picture?"


def data_url(data, mime="image/png"):
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def png(width, height, rows=None):
    """A PNG written by hand (no imaging library in the test environment): 8-bit RGB."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    raw_rows = rows if rows is not None else b"".join(b"\0" + b"\x80" * (3 * width)
                                                    for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw_rows)) + chunk(b"IEND", b""))


def image_message(*urls, text=IMAGE_PROMPT):
    parts = [{"type": "image_url", "image_url": {"url": u, "detail": "auto"}} for u in urls]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def cli_generate(*images, max_tokens=8):
    args = [BIN, "generate", "--model", "tests/fixtures/tiny-maverick", "--chat", "--json",
            "--prompt", IMAGE_PROMPT, "--max-tokens", str(max_tokens)]
    for image in images:
        args += ["--image", str(image)]
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_an_image_as_a_data_url_gets_the_clis_text(client):
    url = data_url(IMAGE.read_bytes())
    r = client.chat.completions.create(model="tiny-maverick", messages=[image_message(url)],
                                       max_tokens=8, temperature=0)
    cli = cli_generate(IMAGE)
    assert cli["input_ids"] == CASES["image"]["input_ids"]
    assert cli["output_ids"] == CASES["image"]["greedy_new_ids"]
    assert r.choices[0].message.content == cli["text"]
    # The expanded image tokens count as prompt tokens.
    assert r.usage.prompt_tokens == len(CASES["image"]["input_ids"])


def test_several_images_in_one_message(client):
    url = data_url(IMAGE.read_bytes())
    r = client.chat.completions.create(model="tiny-maverick",
                                       messages=[image_message(url, url)],
                                       max_tokens=6, temperature=0)
    cli = cli_generate(IMAGE, IMAGE, max_tokens=6)
    assert r.usage.prompt_tokens == len(cli["input_ids"]) == len(CASES["image"]["input_ids"]) + 17
    assert r.choices[0].message.content == cli["text"]


def test_an_image_in_a_follow_up_turn(client):
    url = data_url(IMAGE.read_bytes())
    first = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."}]
    text_only = client.chat.completions.create(
        model="tiny-maverick", messages=first + [image_message(text="Describe it.")],
        max_tokens=4, temperature=0)
    with_image = client.chat.completions.create(
        model="tiny-maverick", messages=first + [image_message(url, text="Describe it.")],
        max_tokens=4, temperature=0)
    # One <|image|> placeholder becomes 17 tokens: start, 2 tiles of 4 patches, separators,
    # the global tile's marker and patches, end.
    assert with_image.usage.prompt_tokens == text_only.usage.prompt_tokens + 17
    assert with_image.choices[0].message.content is not None


def bad_images():
    image = IMAGE.read_bytes()
    return [
        ("corrupt base64", [data_url(image)[:-3] + "@@@"]),
        ("truncated PNG", [data_url(image[:100])]),
        ("1x1 image", [data_url(png(1, 1))]),
        # A 20000×20000 header over a few bytes of data: refused before any decoding.
        ("decompression bomb", [data_url(png(20000, 20000, rows=b"\0" * 16))]),
        ("too many images", [data_url(image)] * 9),
        ("unsupported format", [data_url(b"BM" + b"\0" * 60, "image/bmp")]),
        ("http URL while fetching is off", ["http://127.0.0.1:9/image.png"]),
    ]


def test_bad_images_get_400s_and_the_server_stays_healthy(client, server):
    for name, urls in bad_images():
        body = json.dumps({"messages": [image_message(*urls)], "max_tokens": 2}).encode()
        status, payload = raw(server, "/v1/chat/completions", body)
        assert status == 400, (name, status, payload)
        assert set(payload["error"]) >= {"message", "type", "param", "code"}, name
        assert payload["error"]["type"] == "invalid_request_error", name
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-maverick",
                                       messages=[image_message(bad_images()[1][1][0])],
                                       max_tokens=2)
    # Images are a chat feature.
    status, payload = raw(server, "/v1/completions", json.dumps(
        {"prompt": [{"type": "image_url", "image_url": {"url": data_url(IMAGE.read_bytes())}}]}
    ).encode())
    assert status == 400 and "chat" in payload["error"]["message"]
    with urllib.request.urlopen(server + "/health", timeout=10) as r:
        assert r.status == 200
    url = data_url(IMAGE.read_bytes())
    r = client.chat.completions.create(model="tiny-maverick", messages=[image_message(url)],
                                       max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2


def test_a_text_only_model_refuses_images():
    proc, base = start_cluster("--model", "tests/fixtures/tiny-scout")
    try:
        body = json.dumps({"messages": [image_message(data_url(IMAGE.read_bytes()))],
                           "max_tokens": 2}).encode()
        status, payload = raw(base, "/v1/chat/completions", body)
        assert status == 400 and "text only" in payload["error"]["message"], payload
        status, _ = raw(base, "/v1/chat/completions", json.dumps(
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode())
        assert status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


class _Images(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/image.png":
            data = IMAGE.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        else:
            self.send_response(302)
            self.send_header("Location", "file:///etc/passwd")
            self.end_headers()

    def log_message(self, *args):
        pass


def test_image_urls_are_fetched_when_allowed():
    images = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    proc, base = start_cluster("--allow-image-urls")
    try:
        port = images.server_address[1]
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)
        r = client.chat.completions.create(
            model="tiny-maverick", messages=[image_message(f"http://127.0.0.1:{port}/image.png")],
            max_tokens=8, temperature=0)
        assert r.choices[0].message.content == cli_generate(IMAGE)["text"]
        body = json.dumps({"messages": [image_message(f"http://127.0.0.1:{port}/moved")],
                           "max_tokens": 2}).encode()
        status, payload = raw(base, "/v1/chat/completions", body)
        assert status == 400 and "redirect" in payload["error"]["message"], payload
    finally:
        images.shutdown()
        proc.terminate()
        proc.wait(timeout=30)


def reference_logits(case):
    """The case's prompt logits from the fixture's reference.safetensors, as rows."""
    path = ROOT / "tests/fixtures/tiny-maverick/reference.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    entry = json.loads(data[8:8 + n])[f"{case}.logits"]
    rows, vocab = entry["shape"]
    start, end = entry["data_offsets"]
    flat = struct.unpack(f"<{rows * vocab}f", data[8 + n + start:8 + n + end])
    return [flat[r * vocab:(r + 1) * vocab] for r in range(rows)]


def log_softmax(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_logprobs_are_the_references_like_lm_eval_asks(client, max_tokens):
    # lm-eval-harness's loglikelihood request: token ids, echo, logprobs=1, temperature 0.
    case = CASES["long"]
    ids = case["input_ids"]
    r = client.completions.create(model="tiny-maverick", prompt=ids, echo=True,
                                  max_tokens=max_tokens, logprobs=1, temperature=0, seed=1234)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + max_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = [log_softmax(row) for row in reference_logits("long")]
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - ref[i - 1][ids[i]]) < 5e-3, i
        # The legacy shape's alternatives hold the top one and the token itself.
        assert max(lp.top_logprobs[i].values()) >= lp.token_logprobs[i]
    if max_tokens:
        # The greedy continuation is the top alternative (lm-eval's is_greedy).
        assert r.choices[0].text.startswith(client.post(
            "/detokenize", body={"tokens": ids}, cast_to=object)["prompt"])
        first = case["greedy_new_ids"][0]
        assert abs(lp.token_logprobs[-1] - ref[-1][first]) < 5e-3
        assert lp.token_logprobs[-1] == max(lp.top_logprobs[-1].values())
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert r.usage.completion_tokens == max_tokens


def test_chat_logprobs_streamed_and_not(client):
    kwargs = dict(model="tiny-maverick", messages=[{"role": "user", "content": "Why experts?"}],
                  max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    whole = client.chat.completions.create(**kwargs)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens
    for e in content:
        assert len(e.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert e.logprob == e.top_logprobs[0].logprob
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob
        assert bytes(e.bytes) == e.token.encode()
    streamed = []
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    plain = client.chat.completions.create(**{**kwargs, "logprobs": False, "top_logprobs": None})
    assert plain.choices[0].logprobs is None


def test_streamed_completion_logprobs_with_echo(client):
    kwargs = dict(model="tiny-maverick", prompt="The cluster grows", max_tokens=5,
                  temperature=0.8, seed=3, logprobs=2, echo=True)
    whole = client.completions.create(**kwargs).choices[0]
    tokens, lps, offsets, text = [], [], [], ""
    for chunk in client.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            text += c.text
            if c.logprobs:
                tokens += c.logprobs.tokens
                lps += c.logprobs.token_logprobs
                offsets += c.logprobs.text_offset
    assert text == whole.text and text.startswith("The cluster grows")
    assert tokens == whole.logprobs.tokens and lps == whole.logprobs.token_logprobs
    assert offsets == whole.logprobs.text_offset


def test_n_choices_are_seeded_and_streamed_alike(client):
    kwargs = dict(model="tiny-maverick", prompt="Experts move", max_tokens=10,
                  temperature=1.5, seed=7)
    one = client.completions.create(**kwargs)
    many = client.completions.create(**kwargs, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert many.choices[0].text == one.choices[0].text, "choice 0 draws what n=1 draws"
    assert len({c.text for c in many.choices}) > 1
    assert many.usage.completion_tokens == 30 and many.usage.prompt_tokens == one.usage.prompt_tokens
    texts = ["", "", ""]
    for chunk in client.completions.create(**kwargs, n=3, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in many.choices]
    chat = client.chat.completions.create(
        model="tiny-maverick", messages=[{"role": "user", "content": "hi"}], n=2,
        max_tokens=4, temperature=1.0, seed=1)
    assert [c.index for c in chat.choices] == [0, 1]


def test_penalties_and_logit_bias_change_the_greedy_text(client):
    case = CASES["short"]
    ids, greedy = case["input_ids"], case["greedy_new_ids"]
    kwargs = dict(model="tiny-maverick", prompt=ids, max_tokens=len(greedy), temperature=0)

    def tokens(extra=None, **fields):
        extra = {"return_token_ids": True, "ignore_eos": True, **(extra or {})}
        r = client.completions.create(**kwargs, **fields, extra_body=extra)
        return r.choices[0].model_extra["token_ids"]

    assert tokens() == greedy
    # The reference repeats 556 three times: a frequency penalty breaks the run.
    assert tokens(frequency_penalty=2.0)[:2] == greedy[:2]
    assert tokens(frequency_penalty=2.0) != greedy
    assert tokens(presence_penalty=2.0) != greedy
    assert tokens({"repetition_penalty": 2.0}) != greedy
    assert tokens(logit_bias={str(greedy[0]): -100})[0] != greedy[0]
    assert tokens(logit_bias={"5": 100}) == [5] * len(greedy)


def test_new_fields_are_validated(server):
    cases = [
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "n": 17}, "n"),
        ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
        ({"prompt": "x", "logit_bias": {"999999": 1}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"5": 200}}, "logit_bias"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ]
    for body, param in cases:
        status, payload = raw(server, "/v1/completions", json.dumps(body).encode())
        assert status == 400 and payload["error"]["param"] == param, (body, payload)
    status, payload = raw(server, "/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}).encode())
    assert status == 400 and payload["error"]["param"] == "top_logprobs"
    with urllib.request.urlopen(server + "/health", timeout=10) as r:
        assert r.status == 200


SCHEMA = {"type": "object", "additionalProperties": False,
          "required": ["name", "experts", "ok", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "experts": {"type": "integer", "minimum": 0, "maximum": 128},
                         "ok": {"type": "boolean"},
                         "tags": {"type": "array", "maxItems": 2,
                                  "items": {"enum": ["moe", "dense"]}}}}


def fits(v):
    return (isinstance(v, dict) and set(v) == set(SCHEMA["required"])
            and isinstance(v["name"], str) and len(v["name"]) <= 12
            and type(v["experts"]) is int and 0 <= v["experts"] <= 128
            and type(v["ok"]) is bool and len(v["tags"]) <= 2
            and all(t in ("moe", "dense") for t in v["tags"]))


def test_a_json_schema_from_random_weights_parses_and_fits(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "cluster", "schema": SCHEMA, "strict": True}}
    for seed in range(3):
        kwargs = dict(model="tiny-maverick", messages=[{"role": "user", "content": "json"}],
                      max_tokens=200, temperature=1.0, seed=seed, response_format=fmt)
        r = client.chat.completions.create(**kwargs)
        assert r.choices[0].finish_reason == "stop"
        assert fits(json.loads(r.choices[0].message.content)), r.choices[0].message.content
        streamed = "".join(c.choices[0].delta.content or "" for c in
                           client.chat.completions.create(**kwargs, stream=True) if c.choices)
        assert streamed == r.choices[0].message.content


def test_json_object_regex_and_choice(client):
    r = client.completions.create(model="tiny-maverick", prompt="x", max_tokens=300, temperature=1.0,
                                  seed=2, extra_body={"response_format": {"type": "json_object"}})
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].text), dict)
    for seed in range(3):
        r = client.completions.create(model="tiny-maverick", prompt="x", max_tokens=20, temperature=1.0,
                                      seed=seed, extra_body={"structured_outputs": {"regex": "[a-z]{3}-[0-9]{2}"}})
        assert re.fullmatch("[a-z]{3}-[0-9]{2}", r.choices[0].text), r.choices[0].text
        choices = ["yes", "no", 'maybe "so"']
        r = client.completions.create(model="tiny-maverick", prompt="x", max_tokens=20, temperature=1.0,
                                      seed=seed, extra_body={"guided_choice": choices})
        assert r.choices[0].text in choices and r.choices[0].finish_reason == "stop"


def test_grammars_that_do_not_compile_are_400s_naming_the_field(server):
    chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 4}
    cases = [
        ({"response_format": {"type": "json_schema", "json_schema": {
            "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}}},
         "response_format", "nonsense"),
        ({"response_format": {"type": "xml"}}, "response_format", "type"),
        ({"structured_outputs": {"regex": "("}}, "structured_outputs", "regex"),
        ({"guided_choice": []}, "guided_choice", "list"),
        ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "guided_regex", "at most one"),
    ]
    for extra, param, word in cases:
        status, payload = raw(server, "/v1/chat/completions", json.dumps({**chat, **extra}).encode())
        assert status == 400, (extra, payload)
        assert payload["error"]["param"] == param and word in payload["error"]["message"], payload
    with urllib.request.urlopen(server + "/health", timeout=10) as r:
        assert r.status == 200


TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city.",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "days"],
                       "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                      "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}},
    {"type": "function", "function": {
        "name": "get_time",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["tz"],
                       "properties": {"tz": {"enum": ["CET", "UTC"]}}}}},
]


@pytest.fixture(scope="module")
def tools_client():
    # The fixture's own template has no tools: this one renders them as Llama 4's does.
    proc, base = start_cluster("--chat-template", str(ROOT / "tests/fixtures/llama4-tools.jinja"))
    yield openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60), base
    proc.terminate()
    proc.wait(timeout=30)


def call_fits(call):
    args = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        return args["city"] in ("Paris", "Oslo") and 1 <= args["days"] <= 7 and len(args) == 2
    return call.function.name == "get_time" and args == {"tz": args["tz"]} and args["tz"] in ("CET", "UTC")


def test_forced_tool_calls_from_random_weights_are_valid_calls(tools_client):
    client, _ = tools_client
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    for seed in range(3):
        kwargs = dict(model="tiny-maverick", messages=messages, tools=TOOLS, tool_choice="required",
                      max_tokens=120, temperature=1.0, seed=seed)
        r = client.chat.completions.create(**kwargs)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert choice.message.tool_calls and all(call_fits(c) for c in choice.message.tool_calls)
        assert len({c.id for c in choice.message.tool_calls}) == len(choice.message.tool_calls)
        streamed, finish = [], None
        for chunk in client.chat.completions.create(**kwargs, stream=True):
            delta = chunk.choices[0].delta
            assert not delta.content
            streamed += delta.tool_calls or []
            finish = chunk.choices[0].finish_reason or finish
        assert finish == "tool_calls"
        assert [(c.function.name, c.function.arguments) for c in streamed] == \
            [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    named = client.chat.completions.create(
        model="tiny-maverick", messages=messages, tools=TOOLS, max_tokens=60, temperature=1.0,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = named.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "get_time" and call_fits(calls[0])
    single = client.chat.completions.create(
        model="tiny-maverick", messages=messages, tools=TOOLS, tool_choice="required",
        parallel_tool_calls=False, max_tokens=120, temperature=1.0, seed=4)
    assert len(single.choices[0].message.tool_calls) == 1


def test_tool_results_go_back_through_the_template(tools_client):
    client, _ = tools_client
    messages = [{"role": "user", "content": "Time?"}]
    r = client.chat.completions.create(
        model="tiny-maverick", messages=messages, tools=TOOLS, max_tokens=40, temperature=1.0,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    call = r.choices[0].message.tool_calls[0]
    follow = messages + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]},
        {"role": "tool", "tool_call_id": call.id, "content": "12:00"}]
    answer = client.chat.completions.create(model="tiny-maverick", messages=follow, tools=TOOLS,
                                            max_tokens=8, temperature=0, tool_choice="none")
    # The call and its result are in the prompt: more tokens than the question alone.
    assert answer.usage.prompt_tokens > r.usage.prompt_tokens
    assert answer.choices[0].message.tool_calls is None
    assert answer.choices[0].finish_reason in ("stop", "length")
    # With "auto", text that is not a call stays text.
    auto = client.chat.completions.create(model="tiny-maverick", messages=messages, tools=TOOLS,
                                          max_tokens=8, temperature=0)
    assert auto.choices[0].message.tool_calls is None and isinstance(auto.choices[0].message.content, str)


def test_tool_requests_are_validated(tools_client):
    _, base = tools_client
    chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 4}
    cases = [
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0]"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
         "tool_choice"),
        ({"messages": [{"role": "tool", "content": "1", "tool_call_id": 5}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}]},
         "messages[0].tool_calls"),
    ]
    for extra, param in cases:
        status, payload = raw(base, "/v1/chat/completions", json.dumps({**chat, **extra}).encode())
        assert status == 400 and payload["error"]["param"] == param, (extra, payload)


def test_best_of_returns_the_most_likely_choices(client):
    kwargs = dict(model="tiny-maverick", prompt="Experts move", max_tokens=8, temperature=1.0,
                  seed=11, logprobs=0)
    many = client.completions.create(**kwargs, n=4)
    ranked = sorted(many.choices, key=lambda c: -sum(c.logprobs.token_logprobs))
    best = client.completions.create(**kwargs, n=2, best_of=4)
    assert [c.text for c in best.choices] == [c.text for c in ranked[:2]]
    assert [c.index for c in best.choices] == [0, 1]
    assert best.usage.completion_tokens == many.usage.completion_tokens
    plain = client.completions.create(**{**kwargs, "logprobs": None}, best_of=4)
    assert plain.choices[0].text == ranked[0].text and plain.choices[0].logprobs is None


def test_tokenize_renders_tools_like_the_chat(tools_client):
    client, base = tools_client
    messages = [{"role": "user", "content": "Time?"}]
    status, body = raw(base, "/tokenize", json.dumps({"messages": messages, "tools": TOOLS}).encode())
    assert status == 200
    r = client.chat.completions.create(model="tiny-maverick", messages=messages, tools=TOOLS,
                                       max_tokens=1, tool_choice="none")
    assert body["count"] == r.usage.prompt_tokens
    status, plain = raw(base, "/tokenize", json.dumps({"messages": messages}).encode())
    assert plain["count"] < body["count"]


def test_up_without_a_model_answers_the_readme_question_in_words():
    """The README's first curl: the demo model's greedy answer, as transformers gave it."""
    proc, base = start_cluster(model=None)
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["expertmesh-demo"]
        readme = (ROOT / "README.md").read_text()
        shown = re.search(r'"content": "(What is a lantern\?)"\}\], "temperature": 0', readme)
        answer = re.search(r'# \.\.\. "content":"([^"]*)"', readme)
        assert shown and answer, "the README's first curl and its answer"
        r = client.chat.completions.create(
            model="expertmesh-demo", messages=[{"role": "user", "content": shown.group(1)}],
            temperature=0)
        assert r.choices[0].message.content == answer.group(1)
        assert r.choices[0].finish_reason == "stop"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
