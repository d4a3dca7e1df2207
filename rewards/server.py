"""Serve any registered reward over HTTP: `python -m rewards.server --reward NAME --options JSON --port P`.

Two backends: `batching` (default; FastAPI + uvicorn, requests of all clients merged into shared reward calls, workers
on several devices: rewards/serving.py, `pip install grpo-img[serve]`) and `stdlib` (this module: the standard
library's threaded server, one request at a time under a lock, no extra dependencies). Both speak the wire format
below, with the same limits (rewards/wire.py holds what they share: request decoding, image checks).

Why: a reward whose dependencies clash with the trainer's (Flow-GRPO runs GenEval's mmdet in its own env) or that
needs its own GPU runs as a separate process; the trainer calls it through the "remote" reward (rewards/remote.py)
like a local one.

Wire format (deliberate deviation from Flow-GRPO's `reward-server`, shared/notes/rewards.md §5, which unpickles
request bodies, so that anyone who can reach its port can run code on it): JSON only, never pickle.
- `POST /score`, `Content-Type: application/json`:
  `{"images": [base64 PNG or JPEG bytes], "prompts": [str], "metadata": [object]}` (equal lengths).
- 200: `{"scores": [number | null], "errors": [str | null]}`; a sample whose reward raised (or returned no
  score) has `null` and the reason, the other samples are scored (rewards.base.score_isolated).
- 400 malformed JSON/fields/images (also JSON nested too deep or a number too long to parse), 411 no
  Content-Length, 413 body over --max-bytes, an image over 4096x4096 pixels or a request over --max-pixels in all
  (sizes read from the image headers, before anything is decoded), 415 not JSON, 404 unknown path, 408 a client
  that has not sent its whole request within --request-timeout seconds, 500 the reward broke its contract (wrong
  count, non-numbers). The server keeps serving after any of them.
- `GET /health`: `{"reward": NAME, "requests": n, "samples": n}` (counts of answered /score calls).
stdlib backend: requests are handled in threads but the reward is called under a lock (reward models are rarely
thread-safe). The batching backend adds `batches`, `workers` and `max_batch_size` to /health.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import rewards
from rewards import serving
from rewards.base import Reward, RewardContractError, score_isolated
from rewards.wire import (DEFAULT_MAX_BYTES, DEFAULT_MAX_REQUEST_PIXELS, DEFAULT_REQUEST_TIMEOUT, BadRequest,
                          decode_request, encode_image)

__all__ = ["RewardServer", "decode_request", "encode_image", "main"]  # encode_image: for clients of this module

log = logging.getLogger("rewards.server")

class RewardServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], reward: Reward, reward_name: str,
                 max_bytes: int = DEFAULT_MAX_BYTES, max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT):
        super().__init__(address, RewardHandler)
        self.reward, self.reward_name, self.max_bytes = reward, reward_name, max_bytes
        self.max_request_pixels, self.request_timeout = max_request_pixels, request_timeout
        self.lock = threading.Lock()
        self.requests = self.samples = 0


class RewardHandler(BaseHTTPRequestHandler):
    server: RewardServer

    def setup(self):
        super().setup()
        # A slow client may not hold a thread: the whole request (headers and body) has a deadline. Reads time out
        # on their own; a client that trickles bytes is cut off by a timer that shuts its socket.
        self.connection.settimeout(self.server.request_timeout)
        self.deadline = time.monotonic() + self.server.request_timeout
        self.received = False
        self.expiry = threading.Timer(self.server.request_timeout, self._expire)
        self.expiry.daemon = True
        self.expiry.start()

    def _expire(self):
        if not self.received:
            log.warning("%s: request not received within %s s; closed", self.address_string(),
                        self.server.request_timeout)
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def finish(self):
        self.expiry.cancel()
        super().finish()

    def handle_one_request(self):
        try:
            super().handle_one_request()
        except TimeoutError:  # headers not sent in time
            self.close_connection = True

    def read_body(self, length: int) -> bytes | None:
        """The body, or None when the client did not send it before the deadline."""
        chunks, remaining = [], length
        while remaining:
            left = self.deadline - time.monotonic()
            if left <= 0:
                return None
            self.connection.settimeout(left)
            try:
                chunk = self.rfile.read1(min(remaining, 1 << 20))
            except TimeoutError:
                return None
            if not chunk:
                return None
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def do_GET(self):
        self.received = True
        if self.path != "/health":
            return self._reply(404, {"error": f"unknown path {self.path!r}; use POST /score or GET /health"})
        self._reply(200, {"reward": self.server.reward_name, "requests": self.server.requests,
                          "samples": self.server.samples})

    def do_POST(self):
        if self.path != "/score":
            return self._reply(404, {"error": f"unknown path {self.path!r}; use POST /score"})
        if self.headers.get_content_type() != "application/json":
            return self._reply(415, {"error": "Content-Type must be application/json (never pickle)"})
        try:
            length = int(self.headers["Content-Length"])
        except (TypeError, ValueError):
            return self._reply(411, {"error": "a Content-Length header is required"})
        if length < 0 or length > self.server.max_bytes:
            return self._reply(413, {"error": f"body of {length} bytes is over the {self.server.max_bytes} limit; "
                                              "send smaller batches"})
        body = self.read_body(length)
        self.received = body is not None
        if body is None:
            log.warning("%s: request not received within %s s; closed", self.address_string(),
                        self.server.request_timeout)
            return self._reply(408, {"error": f"the request was not received within {self.server.request_timeout} "
                                              "s"})
        try:
            images, prompts, metadata = decode_request(body, self.server.max_request_pixels)
        except BadRequest as error:
            return self._reply(error.status, {"error": str(error)})
        try:
            with self.server.lock:
                scores, errors = score_isolated(self.server.reward, images, prompts, metadata,
                                                f"reward {self.server.reward_name!r}")
                self.server.requests += 1
                self.server.samples += len(images)
        except RewardContractError as error:
            return self._reply(500, {"error": f"RewardContractError: {error}"})
        self._reply(200, {"scores": [s if math.isfinite(s) else None for s in scores], "errors": errors})

    def _reply(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.close_connection = True  # an unread (refused) body must not be parsed as the next request
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client is gone (or too slow to read): nothing to answer
            pass

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        log.info("%s %s", self.address_string(), format % args)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reward", required=True, help=f"one of: {', '.join(rewards.available())}")
    parser.add_argument("--options", default="{}", help="the reward's options as a JSON object")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    parser.add_argument("--port", type=int, default=18085, help="0 picks a free port (printed on start)")
    parser.add_argument("--backend", choices=("batching", "stdlib"), default="batching",
                        help="batching: FastAPI + uvicorn, requests of all clients batched together "
                        "(rewards/serving.py; pip install grpo-img[serve]); stdlib: this module's threaded server, "
                        "one request at a time, no extra dependencies")
    parser.add_argument("--max-batch-size", type=int, default=64,
                        help="batching: most images scored in one reward call, over all requests merged into it")
    parser.add_argument("--batch-timeout", type=float, default=0.01,
                        help="batching: seconds a batch waits for further requests once it has its first")
    parser.add_argument("--devices", default=None,
                        help="batching: where the reward copies run: a count N (cuda:0..N-1) or a list "
                        "(cuda:0,cuda:1); default: the reward's own device, one copy")
    parser.add_argument("--workers-per-device", type=int, default=1,
                        help="batching: reward copies (worker threads) per device")
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="largest request body accepted")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_REQUEST_PIXELS,
                        help="most image pixels in one request, all images together (checked before decoding)")
    parser.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT,
                        help="seconds a client has to send its whole request")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    options = json.loads(args.options)
    if not isinstance(options, dict):
        parser.error("--options must be a JSON object")
    if args.backend == "stdlib":
        reward = rewards.build(args.reward, **options)
        server = RewardServer((args.host, args.port), reward, args.reward, args.max_bytes, args.max_pixels,
                              args.request_timeout)
        host, port = server.server_address[:2]
        print(f"serving reward {args.reward!r} on http://{host}:{port}", flush=True)  # tests wait for this line
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
        return
    missing = serving.missing_dependencies()
    if missing:
        parser.error(f"the batching server needs {', '.join(missing)}: pip install 'grpo-img[serve]', or run "
                     "--backend stdlib")
    if args.workers_per_device < 1:
        parser.error("--workers-per-device must be >= 1")
    try:
        devices = serving.parse_devices(args.devices)
    except ValueError as error:
        parser.error(str(error))
    copies = [rewards.build(args.reward, **options, **({"device": d} if d is not None else {}))
              for d in devices for _ in range(args.workers_per_device)]
    try:
        serving.serve(copies, args.reward, args.host, args.port, args.max_batch_size, args.batch_timeout,
                      args.max_bytes, args.max_pixels, args.request_timeout)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main(sys.argv[1:])
