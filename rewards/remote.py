"""A reward scored by a reward server (rewards/server.py), used like a local one: `{"name": "remote", "url": ...}`.

Images go as base64 PNG (default, lossless: scores equal the local reward's) or JPEG (smaller; what Flow-GRPO's
client sends), metadata as JSON; never pickle. Requests carry at most `batch_size` samples (Flow-GRPO sends 64).
Each request has a `timeout` and is retried `retries` times on connection errors, timeouts and 5xx answers, with
a short growing pause; 4xx answers (our request is wrong) and garbage answers are not retried. When the server
cannot be reached the call raises `RewardUnavailable`, which the trainer turns into an unscored step (and stops
after max_reward_failure_steps such steps in a row); samples the server reports as failed come back as NaN, their
reasons in `last_errors`.
"""

from __future__ import annotations

import json
import logging
import math
import time
import urllib.error
import urllib.request

from rewards.base import Reward, RewardContractError, RewardUnavailable
from rewards.server import encode_image

log = logging.getLogger("rewards.remote")


class RemoteReward(Reward):
    name = "remote"

    def __init__(self, url: str = "http://127.0.0.1:18085", timeout: float = 120.0, retries: int = 3,
                 batch_size: int = 64, image_format: str = "png", backoff: float = 0.5):
        if batch_size < 1 or retries < 0 or timeout <= 0:
            raise ValueError(f"need batch_size >= 1, retries >= 0, timeout > 0; got {batch_size}, {retries}, "
                             f"{timeout}")
        if image_format not in ("png", "jpeg"):
            raise ValueError(f"image_format must be 'png' or 'jpeg', not {image_format!r}")
        self.url = url.rstrip("/")
        self.timeout, self.retries, self.batch_size = timeout, retries, batch_size
        self.image_format, self.backoff = image_format, backoff
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
        request = urllib.request.Request(f"{self.url}/score", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        attempts = self.retries + 1
        for attempt in range(attempts):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
                break
            except urllib.error.HTTPError as error:
                detail = error.read()[:300].decode(errors="replace")
                if error.code < 500:
                    raise ValueError(f"reward server at {self.url} refused the request ({error.code}): "
                                     f"{detail}") from None
                if error.code == 500 and "RewardContractError" in detail:
                    raise RewardContractError(f"reward server at {self.url}: {detail}") from None
                last = f"HTTP {error.code}: {detail}"
            except (urllib.error.URLError, OSError) as error:  # refused, reset, DNS, timeout
                reason = getattr(error, "reason", error)
                last = f"{type(reason).__name__}: {reason}"
            if attempt + 1 < attempts:
                log.warning("reward server at %s: %s; retry %d of %d", self.url, last, attempt + 1, self.retries)
                time.sleep(self.backoff * 2 ** attempt)
        else:
            raise RewardUnavailable(f"reward server at {self.url} did not answer after {attempts} attempt(s) "
                                    f"(timeout {self.timeout} s each); last error: {last}. Is "
                                    "`python -m rewards.server` running there?")
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise RewardContractError(f"reward server at {self.url} answered with something that is not JSON: "
                                      f"{raw[:200]!r}") from None
