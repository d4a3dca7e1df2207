"""The reward service on FastAPI + uvicorn with cross-client batching: `python -m rewards.server` (needs
`pip install grpo-img[serve]`; `--backend stdlib` is the dependency-free threaded server of rewards/server.py).

Same wire format and guarantees as the stdlib server (JSON with base64 PNG/JPEG, never pickle; 4xx for malformed
input before it reaches the reward; per-sample errors; size limits; `GET /health`), plus:

- **Dynamic batching.** Requests from every client go into one queue. A worker takes the oldest request and adds
  further ones while the batch holds at most `max_batch_size` images and `batch_timeout` seconds have not passed
  since it took the first; it waits only while some request is still being received (its body read, checked,
  decoded), so a batch is closed as soon as nothing more is on its way. It scores all their images in one reward
  call and hands each request exactly its own scores back, in its order. A request larger than `max_batch_size` is
  scored alone, whole.
- **Workers and devices.** `devices` x `workers_per_device` workers, each with its own copy of the reward built
  on its device (`device=` option), all taking from the one queue. Workers are threads of one process: a reward
  model releases the GIL in its kernels, the health counters are one set, and requests are never copied between
  processes.
- **A request schema** (pydantic, strict): an object with exactly `images` (strings), `prompts` (strings) and
  `metadata` (objects), of equal lengths; anything else is a 400 naming the field, before any image is opened.

Why not LitServe (which batches across clients and runs a worker per GPU): its batching unit is the request
while ours carry many images each, its workers are processes that receive each request pickled from the API
process (a 256 MB body copied twice, and health counters split per process), and the body limits below must act
on the raw bytes before any JSON is parsed. A batching queue of our own on FastAPI is ~100 lines and keeps all
of that explicit.
"""

import asyncio
import concurrent.futures
import logging
import math
import queue
import socket
import threading
import time
from dataclasses import dataclass, field

import importlib.util

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from rewards.base import Reward, RewardContractError, score_isolated
from rewards.wire import (DEFAULT_MAX_BYTES, DEFAULT_MAX_REQUEST_PIXELS, DEFAULT_REQUEST_TIMEOUT, BadRequest,
                          TooLarge, open_images)

log = logging.getLogger("rewards.serving")
SERVE_PACKAGES = {"fastapi": "fastapi", "uvicorn": "uvicorn"}  # module -> pip package ([serve] extra)


def missing_dependencies() -> list[str]:
    """The [serve] packages that are not installed (FastAPI and uvicorn are imported only when serving, so that
    rewards.server and the trainer import without them)."""
    return [package for module, package in SERVE_PACKAGES.items() if importlib.util.find_spec(module) is None]


class ScoreRequest(BaseModel):
    """The body of POST /score."""

    model_config = ConfigDict(extra="forbid", strict=True)
    images: list[str]
    prompts: list[str]
    metadata: list[dict]

    @model_validator(mode="after")
    def _same_lengths(self) -> "ScoreRequest":
        if not len(self.images) == len(self.prompts) == len(self.metadata):
            raise ValueError("'images', 'prompts' and 'metadata' must be lists of equal length")
        return self


class RequestTimeout(BadRequest):
    status = 408


@dataclass
class Job:
    images: list
    prompts: list[str]
    metadata: list[dict]
    done: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class Batcher:
    """One queue of scoring jobs, drained by one thread per reward copy in batches (see the module docstring)."""

    def __init__(self, reward_copies: list[Reward], reward_name: str, max_batch_size: int = 64,
                 batch_timeout: float = 0.01):
        if max_batch_size < 1 or batch_timeout < 0:
            raise ValueError(f"need max_batch_size >= 1 and batch_timeout >= 0, got {max_batch_size}, "
                             f"{batch_timeout}")
        self.reward_name, self.max_batch_size, self.batch_timeout = reward_name, max_batch_size, batch_timeout
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.lock = threading.Lock()
        self.counts = {"requests": 0, "samples": 0, "batches": 0}
        self.receiving = 0  # requests being received: a batch waits for them (up to batch_timeout), not longer
        self.workers = [threading.Thread(target=self._work, args=(reward,), daemon=True, name=f"reward-{i}")
                        for i, reward in enumerate(reward_copies)]
        for worker in self.workers:
            worker.start()

    def arriving(self, change: int) -> None:
        """A request has started (+1) or stopped (-1) being received without becoming a job."""
        with self.lock:
            self.receiving += change

    def submit(self, images: list, prompts: list[str], metadata: list[dict]) -> concurrent.futures.Future:
        """Queue a received request (one that `arriving(+1)` announced) for scoring."""
        job = Job(images, prompts, metadata)
        with self.lock:
            self.receiving -= 1
        self.jobs.put(job)
        return job.done

    def _work(self, reward: Reward) -> None:
        carried: Job | None = None  # a job that did not fit the last batch starts the next one
        while True:
            first = carried if carried is not None else self.jobs.get()
            carried, batch, size = None, [first], len(first.images)
            deadline = time.monotonic() + self.batch_timeout
            while size < self.max_batch_size:
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    left = deadline - time.monotonic()
                    if left <= 0 or self.receiving <= 0:  # nothing more is on its way
                        break
                    try:
                        job = self.jobs.get(timeout=min(left, 0.001))
                    except queue.Empty:
                        continue
                if size + len(job.images) > self.max_batch_size:
                    carried = job
                    break
                batch.append(job)
                size += len(job.images)
            self._score(reward, batch)

    def _score(self, reward: Reward, batch: list[Job]) -> None:
        images = [im for job in batch for im in job.images]
        prompts = [p for job in batch for p in job.prompts]
        metadata = [m for job in batch for m in job.metadata]
        try:
            scores, errors = score_isolated(reward, images, prompts, metadata, f"reward {self.reward_name!r}")
        except Exception as error:  # noqa: BLE001 - a contract error (or worse) fails every request of the batch
            for job in batch:
                job.done.set_exception(error)
            return
        start = 0
        for job in batch:  # each request gets its own slice back, in its order
            end = start + len(job.images)
            job.done.set_result((scores[start:end], errors[start:end]))
            start = end
        with self.lock:
            self.counts["requests"] += len(batch)
            self.counts["samples"] += len(images)
            self.counts["batches"] += 1


def build_app(batcher: Batcher, max_bytes: int = DEFAULT_MAX_BYTES,
              max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS,
              request_timeout: float = DEFAULT_REQUEST_TIMEOUT):
    """The FastAPI app: POST /score into `batcher`, GET /health. (This module has no `from __future__ import
    annotations`: FastAPI reads the endpoints' annotations, and `Request` is imported here, not at the top.)"""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app = FastAPI(title=f"grpo-img reward server ({batcher.reward_name})", docs_url=None, redoc_url=None,
                  openapi_url=None)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.get("/health")
    def health() -> dict:
        with batcher.lock:
            return {"reward": batcher.reward_name, **batcher.counts, "workers": len(batcher.workers),
                    "max_batch_size": batcher.max_batch_size}

    async def receive(request: Request) -> tuple[list, ScoreRequest]:
        """The request's images and fields; BadRequest (with its status) for anything wrong with them."""
        try:  # the whole body within the deadline: a client that trickles it is cut off
            body = await asyncio.wait_for(request.body(), request_timeout)
        except asyncio.TimeoutError:
            log.warning("a request was not received within %s s", request_timeout)
            raise RequestTimeout(f"the request was not received within {request_timeout} s") from None
        if len(body) > max_bytes:  # the header may have lied
            raise TooLarge(f"body is over the {max_bytes} limit")
        try:
            parsed = ScoreRequest.model_validate_json(body)
        except ValidationError as invalid:
            problems = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'body'}: {e['msg']}"
                                 for e in invalid.errors()[:5])
            raise BadRequest(f"malformed request: {problems}") from None
        return await asyncio.to_thread(open_images, parsed.images, max_request_pixels), parsed

    @app.post("/score")
    async def score(request: Request):
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return error(415, "Content-Type must be application/json (never pickle)")
        try:
            length = int(request.headers["content-length"])
        except (KeyError, ValueError):
            return error(411, "a Content-Length header is required")
        if length < 0 or length > max_bytes:
            return error(413, f"body of {length} bytes is over the {max_bytes} limit; send smaller batches")
        batcher.arriving(+1)  # a batch being formed waits for this request while it is received
        try:
            images, parsed = await receive(request)
        except BadRequest as bad:
            batcher.arriving(-1)
            return error(bad.status, str(bad))
        except BaseException:
            batcher.arriving(-1)
            raise
        try:
            scores, errors = await asyncio.wrap_future(batcher.submit(images, parsed.prompts, parsed.metadata))
        except RewardContractError as broken:
            return error(500, f"RewardContractError: {broken}")
        except Exception as broken:  # noqa: BLE001
            return error(500, f"{type(broken).__name__}: {broken}")
        # a ready JSONResponse: FastAPI's encoding of a returned dict costs more than the small reward calls
        return JSONResponse({"scores": [s if math.isfinite(s) else None for s in scores], "errors": errors})

    @app.exception_handler(404)
    async def not_found(request: Request, exc) -> JSONResponse:
        return error(404, f"unknown path {request.url.path!r}; use POST /score or GET /health")

    return app


def parse_devices(devices: str | None) -> list[str | None]:
    """`--devices`: None (the reward's own default device), a count N (cuda:0 .. cuda:N-1) or a comma list."""
    if devices is None or devices == "":
        return [None]
    if devices.isdigit():
        if int(devices) < 1:
            raise ValueError(f"--devices must be >= 1, got {devices}")
        return [f"cuda:{i}" for i in range(int(devices))]
    return [d.strip() for d in devices.split(",") if d.strip()]


def serve(reward_copies: list[Reward], reward_name: str, host: str, port: int, max_batch_size: int,
          batch_timeout: float, max_bytes: int, max_request_pixels: int, request_timeout: float) -> None:
    """Bind, print the address (tests wait for that line), and serve until interrupted."""
    import uvicorn

    batcher = Batcher(reward_copies, reward_name, max_batch_size, batch_timeout)
    app = build_app(batcher, max_bytes, max_request_pixels, request_timeout)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)  # listening before the address is printed: a client may connect at once
    bound_host, bound_port = sock.getsockname()[:2]
    print(f"serving reward {reward_name!r} on http://{bound_host}:{bound_port} ({len(reward_copies)} worker(s), "
          f"batches of up to {max_batch_size} images)", flush=True)
    # timeout_keep_alive: idle pooled client connections are closed after 30 s
    config = uvicorn.Config(app, log_level="warning", timeout_keep_alive=30, h11_max_incomplete_event_size=1 << 16)
    uvicorn.Server(config).run(sockets=[sock])
