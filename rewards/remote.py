"""A reward scored by a reward server (rewards/server.py), used like a local one: `{"name": "remote", "url": ...}`.

Images go as base64 PNG (default, lossless: scores equal the local reward's) or JPEG (smaller; what Flow-GRPO's
client sends), metadata as JSON; never pickle. Requests carry at most `batch_size` samples (Flow-GRPO sends 64).
`timeout` is a deadline for a whole request (connecting, sending, the complete answer), not per socket read, so a
server that trickles bytes cannot hold a call longer; a request is retried `retries` times on connection errors,
timeouts and 5xx answers, with a short growing pause, and all attempts of one request together end by
`total_timeout`. Connections are kept alive and reused (`pool_size` of them, `ConnectionPool`). 4xx answers (our
request is wrong) and garbage answers are not retried. When the server cannot be reached the call raises
`RewardUnavailable`, which the trainer turns into an unscored step (and stops after max_reward_failure_steps such
steps in a row); samples the server reports as failed come back as NaN, their reasons in `last_errors`.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import socket
import threading
import time
import urllib.parse

from rewards.base import Reward, RewardContractError, RewardUnavailable
from rewards.wire import encode_image

log = logging.getLogger("rewards.remote")


class RemoteReward(Reward):
    name = "remote"

    def __init__(self, url: str = "http://127.0.0.1:18085", timeout: float = 60.0, retries: int = 3,
                 batch_size: int = 64, image_format: str = "png", backoff: float = 0.5,
                 total_timeout: float | None = None, pool_size: int = 4):
        total_timeout = 2 * timeout if total_timeout is None else total_timeout
        if batch_size < 1 or retries < 0 or timeout <= 0 or total_timeout <= 0 or pool_size < 1:
            raise ValueError(f"need batch_size >= 1, retries >= 0, timeout > 0, total_timeout > 0, pool_size >= 1; "
                             f"got {batch_size}, {retries}, {timeout}, {total_timeout}, {pool_size}")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be http(s)://host[:port], got {url!r}")
        if image_format not in ("png", "jpeg"):
            raise ValueError(f"image_format must be 'png' or 'jpeg', not {image_format!r}")
        self.url = url.rstrip("/")
        self.timeout, self.total_timeout, self.retries, self.batch_size = timeout, total_timeout, retries, batch_size
        self.image_format, self.backoff = image_format, backoff
        self.pool = ConnectionPool(self.url, size=pool_size)
        self.last_errors: list[str | None] = []

    def __call__(self, images, prompts, metadata):
        if not (len(images) == len(prompts) == len(metadata)):
            raise ValueError(f"got {len(images)} images, {len(prompts)} prompts, {len(metadata)} metadata")
        scores, errors = [], []
        for start in range(0, len(images), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            body = json.dumps({"images": [encode_image(im, self.image_format) for im in images[chunk]],
                               "prompts": list(prompts[chunk]),
                               "metadata": [dict(m or {}) for m in metadata[chunk]]}).encode()
            answer = self._post(body)
            count = len(images[chunk])
            if not (isinstance(answer, dict) and isinstance(answer.get("scores"), list)
                    and isinstance(answer.get("errors"), list) and len(answer["scores"]) == count
                    and len(answer["errors"]) == count):
                raise RewardContractError(f"reward server at {self.url} answered with something that is not "
                                          f"{count} scores: {str(answer)[:200]}")
            scores += [math.nan if s is None else s for s in answer["scores"]]
            errors += answer["errors"]
        self.last_errors = errors
        for prompt, error in zip(prompts, errors):
            if error is not None:
                log.warning("reward server could not score prompt %r: %s", prompt, error)
        return scores

    def _post(self, body: bytes):
        end = time.monotonic() + self.total_timeout
        attempts, attempt, last = self.retries + 1, 0, "no attempt"
        while attempt < attempts and time.monotonic() < end:
            attempt += 1
            try:
                status, raw = self.pool.post("/score", body, min(self.timeout, end - time.monotonic()))
                if status < 400:
                    break
                detail = raw[:300].decode(errors="replace")
                if status < 500:
                    raise ValueError(f"reward server at {self.url} refused the request ({status}): {detail}")
                if status == 500 and "RewardContractError" in detail:
                    raise RewardContractError(f"reward server at {self.url}: {detail}")
                last = f"HTTP {status}: {detail}"
            except (OSError, http.client.HTTPException) as error:  # refused, reset, DNS, deadline passed
                last = f"{type(error).__name__}: {error}"
            pause = min(self.backoff * 2 ** (attempt - 1), max(end - time.monotonic(), 0.0))
            if attempt < attempts and pause > 0:
                log.warning("reward server at %s: %s; retry %d of %d", self.url, last, attempt, self.retries)
                time.sleep(pause)
        else:
            raise RewardUnavailable(f"reward server at {self.url} did not answer after {attempt} attempt(s) "
                                    f"(deadline {self.timeout} s each, {self.total_timeout} s in all); last error: "
                                    f"{last}. Is `python -m rewards.server` running there?")
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise RewardContractError(f"reward server at {self.url} answered with something that is not JSON: "
                                      f"{raw[:200]!r}") from None


class ConnectionPool:
    """Kept-alive connections to one reward server, reused from call to call (at most `size` kept idle), so that
    a trainer's many small requests do not each pay a TCP handshake. Thread-safe.

    A kept connection the server has closed meanwhile (its keep-alive timeout, a restart) fails on first use
    before any answer: that request is sent again once, at once, on a new connection; every other failure is the
    caller's (RemoteReward retries with back-off). A server that closes after each answer (`--backend stdlib`)
    gets a new connection per request."""

    STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError, ConnectionAbortedError)

    def __init__(self, url: str, size: int = 4):
        parts = urllib.parse.urlsplit(url)
        self.connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self.host, self.port, self.path = parts.hostname, parts.port, parts.path.rstrip("/")
        self.size, self.idle, self.lock = size, [], threading.Lock()
        self.opened = 0  # connections made so far

    def post(self, route: str, body: bytes, deadline: float) -> tuple[int, bytes]:
        """POST `body` to `route` and read the whole answer within `deadline` seconds in all."""
        end = time.monotonic() + deadline
        while True:
            with self.lock:
                connection = self.idle.pop() if self.idle else None
            reused = connection is not None
            if connection is None:
                connection = self.connection_class(self.host, self.port, timeout=deadline)
                with self.lock:
                    self.opened += 1
            try:
                status, raw, keep = exchange_with_deadline(connection, self.path + route, body,
                                                           max(end - time.monotonic(), 0.001))
            except self.STALE:
                connection.close()
                if reused:
                    continue  # the server had closed this kept connection: once more on a new one
                raise
            except BaseException:
                connection.close()
                raise
            with self.lock:
                if keep and len(self.idle) < self.size:
                    self.idle.append(connection)
                    connection = None
            if connection is not None:
                connection.close()
            return status, raw

    def close(self) -> None:
        with self.lock:
            idle, self.idle = self.idle, []
        for connection in idle:
            connection.close()


def exchange_with_deadline(connection: http.client.HTTPConnection, path: str, body: bytes, deadline: float
                           ) -> tuple[int, bytes, bool]:
    """(status, body, whether the connection may be kept) of one POST whose whole exchange ends within `deadline`
    seconds: it runs in a thread that is cut off (its socket shut) when the deadline passes."""
    result: dict = {}

    def exchange():
        try:
            if connection.sock is not None:
                connection.sock.settimeout(deadline)
            connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            result["answer"] = (response.status, response.read(), not response.will_close)
        except BaseException as error:  # noqa: BLE001 - handed to the caller
            result["error"] = error

    worker = threading.Thread(target=exchange, daemon=True)
    worker.start()
    worker.join(deadline)
    if worker.is_alive():
        if connection.sock is not None:
            try:
                connection.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        connection.close()
        raise TimeoutError(f"no complete answer within the {deadline:.3g} s deadline (timed out)")
    if "error" in result:
        raise result["error"]
    return result["answer"]
