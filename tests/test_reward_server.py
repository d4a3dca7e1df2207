"""The reward server as a real process on loopback, and the "remote" reward that calls it."""

import base64
import http.client
import io
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

import rewards
from rewards.base import RewardContractError, RewardUnavailable
from rewards.color import COLORS
from rewards.server import encode_image

ROOT = Path(__file__).resolve().parents[1]


def start_server(*args: str) -> tuple[subprocess.Popen, int]:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    process = subprocess.Popen([sys.executable, "-m", "rewards.server", "--port", "0", *args], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = process.stdout.readline()  # printed once the socket is bound
    match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    if not match:
        process.kill()
        raise RuntimeError(f"reward server did not start: {line!r}")
    port = int(match.group(1))
    deadline = time.monotonic() + 10
    while True:  # readiness: /health answers
        try:
            health(port)
            return process, port
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                raise
            time.sleep(0.05)


def health(port: int) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    connection.request("GET", "/health")
    return json.loads(connection.getresponse().read())


def post(port: int, body: bytes, content_type: str = "application/json", headers: dict | None = None
         ) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("POST", "/score", body=body, headers={"Content-Type": content_type, **(headers or {})})
    response = connection.getresponse()
    return response.status, json.loads(response.read())


@pytest.fixture(scope="module", params=["batching", "stdlib"])
def color_server(request):
    """The colour reward served by each backend: they keep the same wire format and guarantees."""
    process, port = start_server("--backend", request.param, "--reward", "color", "--options",
                                 '{"colors": ["red", "green", "blue"]}', "--max-bytes", "20000")
    yield port
    process.terminate()
    process.wait(10)


def scene(seed: int, size: int = 32) -> Image.Image:
    """A few colour blocks, different per seed, so that scores differ between images."""
    image = Image.new("RGB", (size, size), COLORS["blue"])
    image.paste(Image.new("RGB", (size * (seed % 5 + 1) // 6, size), COLORS["red"]), (0, 0))
    image.paste(Image.new("RGB", (size, size * (seed % 3) // 4), COLORS["green"]), (0, 0))
    return image


def test_remote_scores_equal_local_and_batches_split(color_server):
    local = rewards.build("color", colors=["red", "green", "blue"])
    remote = rewards.build("remote", url=f"http://127.0.0.1:{color_server}", batch_size=3)
    images = [scene(i) for i in range(8)]
    prompts = ["a red square", "a blue sky", "green grass", "red"] * 2
    metadata = [{}] * 7 + [{"color": "green"}]
    before = health(color_server)
    expected = local(images, prompts, metadata)
    assert len(set(expected)) > 3  # the images really differ
    assert remote(images, prompts, metadata) == expected
    after = health(color_server)
    assert after["requests"] - before["requests"] == 3  # 8 samples in batches of 3
    assert after["samples"] - before["samples"] == 8
    # JPEG is lossy: close, not equal
    jpeg = rewards.build("remote", url=f"http://127.0.0.1:{color_server}", image_format="jpeg")
    assert jpeg(images, prompts, metadata) == pytest.approx(expected, abs=0.05)


def test_reward_raising_on_the_server_is_a_per_sample_failure(color_server):
    remote = rewards.build("remote", url=f"http://127.0.0.1:{color_server}")
    scores = remote([scene(1), scene(2)], ["a red square", "a cat"], [{}, {}])  # "a cat" names no colour
    assert scores[0] == rewards.build("color", colors=["red", "green", "blue"])([scene(1)], ["red"], [{}])[0]
    assert math.isnan(scores[1])
    assert remote.last_errors[0] is None and "names none of the colours" in remote.last_errors[1]
    assert health(color_server)["reward"] == "color"


def huge_png() -> str:
    """A 5000x4000 bilevel PNG: 3 kB on the wire, 60 MB once decoded to RGB."""
    buffer = io.BytesIO()
    Image.new("1", (5000, 4000)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_malformed_requests_get_4xx_and_the_server_keeps_serving(color_server):
    good = {"images": [encode_image(scene(0))], "prompts": ["red"], "metadata": [{}]}
    assert post(color_server, json.dumps(good).encode())[0] == 200
    cases = {
        400: [b"{not json", b"\xff\xfe", json.dumps({"images": []}).encode(),
              json.dumps({**good, "prompts": ["red", "blue"]}).encode(),
              json.dumps({**good, "images": ["bm90IGFuIGltYWdl"]}).encode(),  # base64 of "not an image"
              json.dumps({**good, "images": ["%%%"]}).encode(),
              json.dumps({**good, "metadata": ["x"]}).encode(),
              b"[" * 9_000 + b"]" * 9_000,  # nested too deep for the parser
              b'{"images": [], "prompts": [], "metadata": [], "n": ' + b"9" * 15_000 + b"}"],  # a 15,000-digit number
        413: [json.dumps({**good, "images": good["images"] * 400}).encode(),
              json.dumps({**good, "images": [huge_png()]}).encode()],
    }
    for status, bodies in cases.items():
        for body in bodies:
            code, answer = post(color_server, body)
            assert code == status and answer["error"], (body[:40], code, answer)
    import pickle  # the point: a pickled body (Flow-GRPO's protocol) is refused, never loaded

    code, answer = post(color_server, pickle.dumps(good), content_type="application/octet-stream")
    assert code == 415 and "never pickle" in answer["error"]
    code, answer = post(color_server, b"", headers={"Content-Length": "999999999"})
    assert code == 413
    assert post(color_server, json.dumps(good).encode()) == (200, {"scores": [5 / 32], "errors": [None]})


def test_total_pixels_per_request_are_capped_before_decoding():
    """Many large images in a small request (PNGs of one colour compress to almost nothing): refused with 413 from
    their headers, before they are decoded, and the server stays small and serving."""
    process, port = start_server("--reward", "color", "--max-pixels", str(3 * 1024 * 1024))
    try:
        big = encode_image(Image.new("RGB", (1024, 1024), COLORS["red"]))
        body = json.dumps({"images": [big] * 4, "prompts": ["red"] * 4, "metadata": [{}] * 4}).encode()
        assert len(body) < 40_000  # 12 megapixels in 28 kB
        code, answer = post(port, body)
        assert code == 413 and "pixels in all" in answer["error"]
        code, answer = post(port, json.dumps({"images": [big] * 3, "prompts": ["red"] * 3,
                                              "metadata": [{}] * 3}).encode())
        assert code == 200 and answer["scores"] == [1.0, 1.0, 1.0]
    finally:
        process.terminate()
        process.wait(10)


def test_slow_clients_are_timed_out_and_do_not_block_others():
    """The stdlib backend: a thread per connection, so even a header trickler is cut off at the deadline (the
    batching backend's slow clients: tests/test_reward_serving.py)."""
    process, port = start_server("--backend", "stdlib", "--reward", "color", "--request-timeout", "1")
    try:
        slow = []
        for _ in range(20):  # half-sent requests: headers promise a body that never comes
            connection = socket.create_connection(("127.0.0.1", port))
            connection.sendall(b"POST /score HTTP/1.1\r\nContent-Type: application/json\r\n"
                               b"Content-Length: 1000\r\n\r\n{\"images\"")
            slow.append(connection)
        trickle = socket.create_connection(("127.0.0.1", port))  # one header byte every 0.2 s, never done
        start = time.monotonic()

        def send_slowly():
            try:
                for byte in b"POST /score HTTP/1.1\r\nContent-Type: application/json\r\n" * 10:
                    trickle.send(bytes([byte]))
                    time.sleep(0.2)
            except OSError:
                pass

        threading.Thread(target=send_slowly, daemon=True).start()
        assert health(port)["reward"] == "color"  # served while they hang
        good = {"images": [encode_image(scene(0))], "prompts": ["red"], "metadata": [{}]}
        assert post(port, json.dumps(good).encode())[0] == 200
        for connection in slow:
            connection.settimeout(5)
            answer = connection.recv(4096)  # the 408 answer, then the server closes
            assert answer.startswith(b"HTTP/1.0 408") or answer == b""
            connection.close()
        trickle.settimeout(5)
        try:
            assert trickle.recv(4096) == b""  # cut off at the deadline although every read was short
        except ConnectionResetError:
            pass
        assert time.monotonic() - start < 2.5
        trickle.close()
    finally:
        process.terminate()
        process.wait(10)


def test_remote_timeout_is_a_deadline_for_the_whole_call():
    """A server that trickles its answer one byte at a time keeps every socket read short; the deadline still holds,
    and all retries together end by total_timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    stop = threading.Event()

    def trickle():
        while not stop.is_set():
            try:
                listener.settimeout(0.2)
                connection, _ = listener.accept()
            except OSError:
                continue
            threading.Thread(target=lambda c=connection: _trickle_answer(c, stop), daemon=True).start()

    threading.Thread(target=trickle, daemon=True).start()
    try:
        remote = rewards.build("remote", url=f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=1.0,
                               retries=0)
        start = time.monotonic()
        with pytest.raises(RewardUnavailable, match="deadline"):
            remote([scene(0)], ["red"], [{}])
        assert time.monotonic() - start < 1.8
        remote = rewards.build("remote", url=f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=0.5,
                               retries=20, backoff=0.01, total_timeout=1.5)
        start = time.monotonic()
        with pytest.raises(RewardUnavailable):
            remote([scene(0)], ["red"], [{}])
        assert time.monotonic() - start < 2.3
    finally:
        stop.set()
        listener.close()


def _trickle_answer(connection: socket.socket, stop: threading.Event) -> None:
    try:
        connection.recv(1 << 16)
        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b" " * 100:
            if stop.is_set():
                break
            connection.send(bytes([byte]))
            time.sleep(0.1)
    except OSError:
        pass
    finally:
        connection.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_down_is_a_clear_error_after_bounded_retries():
    remote = rewards.build("remote", url=f"http://127.0.0.1:{free_port()}", retries=2, backoff=0.05)
    start = time.monotonic()
    with pytest.raises(RewardUnavailable, match=r"did not answer after 3 attempt\(s\).*rewards.server"):
        remote([scene(0)], ["red"], [{}])
    assert time.monotonic() - start < 5


def test_timeout_is_honoured():
    listener = socket.socket()  # accepts connections and never answers
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        remote = rewards.build("remote", url=f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=0.3,
                               retries=1, backoff=0.05)
        start = time.monotonic()
        with pytest.raises(RewardUnavailable, match="2 attempt.*timed out"):
            remote([scene(0)], ["red"], [{}])
        assert 0.6 <= time.monotonic() - start < 3
    finally:
        listener.close()


class Garbage(BaseHTTPRequestHandler):
    def do_POST(self):
        body = b"<html>hello</html>" if self.path == "/score" else b"{}"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_garbage_answer_is_a_clear_error():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Garbage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        remote = rewards.build("remote", url=f"http://127.0.0.1:{server.server_address[1]}")
        with pytest.raises(RewardContractError, match="not JSON"):
            remote([scene(0)], ["red"], [{}])
    finally:
        server.shutdown()
        server.server_close()


def test_remote_options_are_checked():
    with pytest.raises(ValueError, match="unknown option"):
        rewards.build("remote", port=1)
    with pytest.raises(ValueError, match="image_format"):
        rewards.build("remote", image_format="gif")


@pytest.mark.slow
def test_ocr_served_with_options():
    from rewards.ocr import render_text

    process, port = start_server("--reward", "ocr", "--options", '{"engine_options": {"threads": 1}}')
    try:
        remote = rewards.build("remote", url=f"http://127.0.0.1:{port}")
        scores = remote([render_text("HELLO"), render_text("HELLO"), render_text("HELLO")],
                        ['a sign saying "hello"', 'a sign saying "zebra"', "no quotes"], [{}] * 3)
        assert scores[0] == 1.0 and scores[1] < 0.5 and math.isnan(scores[2])
        assert "no text in double quotes" in remote.last_errors[2]
    finally:
        process.terminate()
        process.wait(10)
