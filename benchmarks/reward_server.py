"""Throughput of the reward service: 8 concurrent clients against the stdlib server (one request at a time under
a lock) and the batching server (requests of all clients merged into shared reward calls), the same reward in
one run: `clip` on a small random-weight open_clip model on the CPU, where batching pays as it does on a GPU
(each reward call has a fixed cost: the text tower, Python, kernel launches).

    python benchmarks/reward_server.py [--clients 8] [--requests 40] [--images 2]

Each client sends `--requests` requests of `--images` images (PNG, 64 px) one after another, over one kept-alive
connection where the server allows it; bodies are encoded before the clock starts. Prints images/s per server
and, last, `batched_over_serial=X.XX` (batching images/s over stdlib images/s).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rewards.wire import encode_image  # noqa: E402

# a small CLIP (64 px images, 2 vision and 2 text layers of width 128): its cost per call is mostly fixed, as a
# large model's is on a GPU that has room for the whole batch
SMALL_OPEN_CLIP = {"embed_dim": 64, "quick_gelu": True,
                   "vision_cfg": {"image_size": 64, "layers": 2, "width": 128, "head_width": 64, "patch_size": 16},
                   "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2}}
PROMPTS = ["a photo of a red car", "two dogs on a sofa", "a blue bird on a branch", "a bowl of green apples"]


def save_small_open_clip(path: Path) -> None:
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file(open_clip.CLIP(**SMALL_OPEN_CLIP).state_dict(), str(path / "open_clip_model.safetensors"))
    preprocess = {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
                  "interpolation": "bicubic", "resize_mode": "shortest"}
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": SMALL_OPEN_CLIP,
                                                            "preprocess_cfg": preprocess}))


def start(backend: str, options: dict, extra: list[str]) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen([sys.executable, "-m", "rewards.server", "--backend", backend, "--port", "0",
                                "--reward", "clip", "--options", json.dumps(options), *extra], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = process.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    if not match:
        process.kill()
        raise SystemExit(f"the {backend} server did not start: {line!r}")
    return process, int(match.group(1))


def post(connection: http.client.HTTPConnection, body: bytes) -> dict:
    connection.request("POST", "/score", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    answer = json.loads(response.read())
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {answer}")
    return answer


def run_clients(port: int, bodies: list[list[bytes]]) -> float:
    """Every client's bodies, all clients at once; returns the wall time from the common start."""
    barrier = threading.Barrier(len(bodies) + 1)
    failures = []

    def client(own: list[bytes]):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        barrier.wait()
        try:
            for body in own:
                try:
                    post(connection, body)
                except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                    connection.close()  # the stdlib server closes after each answer: a new connection
                    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
                    post(connection, body)
        except Exception as error:  # noqa: BLE001
            failures.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=client, args=(own,)) for own in bodies]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError(f"{len(failures)} client(s) failed: {failures[0]}")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=40, help="requests per client")
    parser.add_argument("--images", type=int, default=2, help="images per request")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--batch-timeout", type=float, default=0.01)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)

    def body() -> bytes:
        images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(args.images)]
        return json.dumps({"images": [encode_image(im) for im in images],
                           "prompts": [PROMPTS[int(i)] for i in rng.integers(0, len(PROMPTS), args.images)],
                           "metadata": [{}] * args.images}).encode()

    bodies = [[body() for _ in range(args.requests)] for _ in range(args.clients)]
    warmup = [[body()] for _ in range(args.clients)]
    images = args.clients * args.requests * args.images
    with tempfile.TemporaryDirectory() as tmp:
        save_small_open_clip(Path(tmp))
        options = {"model_name": f"local-dir:{tmp}", "pretrained": None, "device": "cpu"}
        results = {}
        for backend, extra in (("stdlib", []), ("batching", ["--max-batch-size", str(args.max_batch_size),
                                                             "--batch-timeout", str(args.batch_timeout)])):
            process, port = start(backend, options, extra)
            try:
                run_clients(port, warmup)
                seconds = run_clients(port, bodies)
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                connection.request("GET", "/health")
                health = json.loads(connection.getresponse().read())
            finally:
                process.terminate()
                process.wait(30)
            results[backend] = images / seconds
            calls = f", {health['batches']} reward calls for {health['requests']} requests" \
                if "batches" in health else ""
            print(f"{backend:<9} {images} images in {seconds:6.2f} s: {images / seconds:7.1f} images/s{calls}",
                  flush=True)
    print(f"clients={args.clients} requests_per_client={args.requests} images_per_request={args.images} "
          f"max_batch_size={args.max_batch_size} batch_timeout={args.batch_timeout}")
    print(f"batched_over_serial={results['batching'] / results['stdlib']:.2f}")


if __name__ == "__main__":
    main()
