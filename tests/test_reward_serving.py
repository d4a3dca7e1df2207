"""The batching reward service (rewards/serving.py) as a real process on loopback: requests of several clients
merged into one reward call with each client getting exactly its own scores, workers on several devices, the
request schema, the remote reward's connection pool, and a bounded fuzz run that the server survives."""

import base64
import io
import json
import os
import pickle
import random
import socket
import threading
import time

import pytest
from PIL import Image

import rewards
from rewards.server import encode_image
from test_reward_models import TINY_OPEN_CLIP
from test_reward_server import health, post, scene, start_server

COLOR_OPTIONS = '{"colors": ["red", "green", "blue"]}'


@pytest.fixture(scope="module")
def batching_server():
    """The colour reward; a batch waits up to 0.3 s for further requests, so concurrent ones are merged."""
    process, port = start_server("--reward", "color", "--options", COLOR_OPTIONS, "--batch-timeout", "0.3",
                                 "--max-batch-size", "64", "--max-bytes", "200000", "--request-timeout", "1")
    yield port
    process.terminate()
    process.wait(10)


def body_of(images, prompts, metadata=None) -> bytes:
    return json.dumps({"images": [encode_image(im) for im in images], "prompts": prompts,
                       "metadata": metadata or [{}] * len(images)}).encode()


def test_concurrent_clients_are_batched_and_each_gets_exactly_its_own_scores(batching_server):
    local = rewards.build("color", colors=["red", "green", "blue"])
    clients = 8
    requests = []
    for c in range(clients):  # different images, prompts and request sizes per client
        count = 1 + c % 3
        images = [scene(7 * c + i) for i in range(count)]
        prompts = [["a red square", "a blue sky", "green grass"][(c + i) % 3] for i in range(count)]
        requests.append((images, prompts, local(images, prompts, [{}] * count)))
    assert len({score for *_, expected in requests for score in expected}) > 5  # the answers are distinguishable
    before = health(batching_server)
    answers = [None] * clients
    barrier = threading.Barrier(clients)

    def client(c):
        images, prompts, _ = requests[c]
        barrier.wait()
        answers[c] = post(batching_server, body_of(images, prompts))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for (status, answer), (images, _, expected) in zip(answers, requests):
        assert status == 200 and answer["scores"] == expected and answer["errors"] == [None] * len(images)
    after = health(batching_server)
    assert after["requests"] - before["requests"] == clients
    assert after["samples"] - before["samples"] == sum(len(images) for images, *_ in requests)
    assert after["batches"] - before["batches"] < clients  # merged: fewer reward calls than requests


def test_a_request_larger_than_the_batch_is_scored_whole_and_a_lone_one_is_not_kept_waiting():
    process, port = start_server("--reward", "color", "--options", COLOR_OPTIONS, "--max-batch-size", "2",
                                 "--batch-timeout", "5")
    try:
        images = [scene(i) for i in range(5)]
        prompts = ["red", "blue", "a cat", "green", "red"]  # "a cat" names no colour: that sample fails alone
        status, answer = post(port, body_of(images, prompts))
        expected = rewards.build("color", colors=["red", "green", "blue"])
        assert status == 200 and answer["scores"][2] is None and "names none of the colours" in answer["errors"][2]
        for i in (0, 1, 3, 4):
            assert answer["scores"][i] == expected([images[i]], [prompts[i]], [{}])[0] and answer["errors"][i] is None
        assert health(port)["batches"] == 1
        # a batch with room left waits for further requests only while one is being received: alone, it is
        # scored at once, not after the 5 s batch timeout
        start = time.monotonic()
        assert post(port, body_of([scene(0)], ["red"]))[0] == 200
        assert time.monotonic() - start < 2.0
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture(scope="module")
def open_clip_dir(tmp_path_factory):
    import open_clip
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("serving_open_clip")
    save_file(open_clip.CLIP(**TINY_OPEN_CLIP).state_dict(), str(path / "open_clip_model.safetensors"))
    preprocess = {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
                  "interpolation": "bicubic", "resize_mode": "shortest"}
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP, "preprocess_cfg": preprocess}))
    return path


def test_workers_on_several_devices_each_hold_a_copy_and_score_like_the_local_reward(open_clip_dir):
    options = {"model_name": f"local-dir:{open_clip_dir}", "pretrained": None, "divide_by": 1.0}
    process, port = start_server("--reward", "clip", "--options", json.dumps(options), "--devices", "cpu,cpu",
                                 "--workers-per-device", "2")
    try:
        assert health(port)["workers"] == 4
        local = rewards.build("clip", device="cpu", **options)
        images, prompts = [scene(i, size=48) for i in range(6)], ["a red car", "a dog", "snow"] * 2
        remote = rewards.build("remote", url=f"http://127.0.0.1:{port}", batch_size=2)
        assert remote(images, prompts, [{}] * 6) == pytest.approx(local(images, prompts, [{}] * 6), abs=1e-4)
    finally:
        process.terminate()
        process.wait(10)


def test_the_request_schema_rejects_bodies_before_the_reward(batching_server):
    good = json.loads(body_of([scene(0)], ["red"]))
    cases = {
        "weights: Extra inputs": {**good, "weights": [1]},
        "images.0": {**good, "images": [3]},
        "prompts.0": {**good, "prompts": [None]},
        "metadata.0": {**good, "metadata": [[1, 2]]},
        "equal length": {**good, "prompts": ["red", "blue"]},
        "images: Field required": {"prompts": ["red"], "metadata": [{}]},
    }
    before = health(batching_server)["requests"]
    for needle, body in cases.items():
        status, answer = post(batching_server, json.dumps(body).encode())
        assert status == 400 and needle in answer["error"], (needle, answer)
    assert health(batching_server)["requests"] == before  # none reached the reward


def test_the_remote_reward_reuses_pooled_connections(batching_server):
    remote = rewards.build("remote", url=f"http://127.0.0.1:{batching_server}", batch_size=1)
    local = rewards.build("color", colors=["red", "green", "blue"])
    images, prompts = [scene(i) for i in range(4)], ["red", "blue", "green", "red"]
    assert remote(images, prompts, [{}] * 4) == local(images, prompts, [{}] * 4)
    assert remote.pool.opened == 1  # four requests over one kept-alive connection


def test_the_pool_reconnects_to_a_server_that_closes_every_connection(tmp_path):
    process, port = start_server("--backend", "stdlib", "--reward", "color", "--options", COLOR_OPTIONS)
    try:
        remote = rewards.build("remote", url=f"http://127.0.0.1:{port}", batch_size=1, retries=0)
        images, prompts = [scene(i) for i in range(3)], ["red", "blue", "green"]
        assert remote(images, prompts, [{}] * 3) == rewards.build("color", colors=["red", "green", "blue"])(
            images, prompts, [{}] * 3)
    finally:
        process.terminate()
        process.wait(10)


def bomb_png() -> str:
    """20000 x 20000 pixels of one colour: a few kB on the wire, 1.2 GB decoded."""
    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class Marker:
    """Unpickling this object writes a file: if the server ever unpickled a body, the file would exist."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def raw_exchange(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(request)
        try:
            return connection.recv(200)
        except (socket.timeout, ConnectionResetError):
            return b""


def test_fuzzed_requests_get_4xx_and_the_server_keeps_serving(batching_server, tmp_path):
    """A bounded fuzz run on loopback: 150 malformed bodies (random mutations of a good one, wrong types,
    truncated base64, decompression bombs, pickles, huge bodies) and slow clients. Every answer is a 4xx, nothing is
    unpickled, and good requests are still scored, right, afterwards."""
    rng = random.Random(0)
    good = body_of([scene(0), scene(1)], ["red", "blue"])
    parsed = json.loads(good)
    marker = tmp_path / "unpickled"
    fixed = [
        pickle.dumps(Marker(str(marker))),
        json.dumps({**parsed, "images": [parsed["images"][0][: len(parsed["images"][0]) // 2], parsed["images"][1]]}
                   ).encode(),  # truncated base64
        json.dumps({**parsed, "images": [bomb_png(), parsed["images"][1]]}).encode(),
        json.dumps({**parsed, "images": "not a list"}).encode(),
        json.dumps([parsed]).encode(),
        b"null", b"", b"{}", b"[" * 5000, json.dumps({**parsed, "prompts": [{"$gt": 1}, "x"]}).encode(),
    ]
    mutated = []
    for _ in range(140):
        data = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            position = rng.randrange(len(data))
            choice = rng.random()
            if choice < 0.4:
                data[position] = rng.randrange(256)
            elif choice < 0.7:
                del data[position: position + rng.randint(1, 50)]
            else:
                data[position:position] = bytes(rng.choice(b'{}[]",:\\0123456789aZ') for _ in range(rng.randint(1, 9)))
        mutated.append(bytes(data))
    statuses = []
    for body in fixed + mutated:
        content_type = "application/octet-stream" if body.startswith(b"\x80") else "application/json"
        status, answer = post(batching_server, body, content_type=content_type)
        statuses.append(status)
        assert status == 200 or 400 <= status < 500, (status, answer, body[:60])
        assert "error" in answer or "scores" in answer
    assert statuses[0] == 415 and statuses[2] == 413
    assert sum(400 <= s < 500 for s in statuses) > 100  # the mutations mostly break the body
    # a body far over --max-bytes, announced honestly, and one whose header lies
    assert post(batching_server, b"x" * 300_000)[0] == 413
    assert raw_exchange(batching_server, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                         b"Content-Length: 999999999\r\n\r\n{").startswith(b"HTTP/1.1 413")
    # slow clients: a half-sent body gets 408 at the request deadline, a header trickler holds no worker
    stalled = socket.create_connection(("127.0.0.1", batching_server), timeout=5)
    stalled.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000"
                    b"\r\n\r\n{\"images\"")
    trickler = socket.create_connection(("127.0.0.1", batching_server), timeout=5)
    trickler.sendall(b"POST /sco")
    start = time.monotonic()
    assert post(batching_server, good)[0] == 200  # served while both hang
    assert stalled.recv(200).startswith(b"HTTP/1.1 408") and time.monotonic() - start < 3
    stalled.close()
    trickler.close()
    assert not marker.exists()
    status, answer = post(batching_server, good)
    local = rewards.build("color", colors=["red", "green", "blue"])
    assert status == 200 and answer["scores"] == local([scene(0), scene(1)], ["red", "blue"], [{}, {}])
    assert health(batching_server)["reward"] == "color"


def test_without_the_serve_extra_the_batching_server_names_it(monkeypatch, capsys):
    import importlib.util

    from rewards import server

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",  # as on a machine without grpo-img[serve]
                        lambda name, *a: None if name in ("fastapi", "uvicorn") else find_spec(name, *a))
    with pytest.raises(SystemExit):
        server.main(["--reward", "color", "--options", COLOR_OPTIONS, "--port", "0"])
    assert "pip install 'grpo-img[serve]'" in capsys.readouterr().err
