"""How the cost of one decode step grows over an image: ms/step at t = 0, T/4, T/2 and T-1 for `policy.sample`
(dynamic cache), `policy.sample` with the static cache, and transformers' `generate`, on the same model and batch.

    python benchmarks/step_profile.py --size mid --batch 8 --group 4     # Janus, hidden 1024, 8 layers, 576 tokens

A forward hook on the language model's first decoder layer stamps every forward (the engine's decode steps call
the layers, not the stack's forward); a step's time is the gap between consecutive stamps (for `policy.sample` the
conditional and unconditional rows are one forward, as in `generate`). Printed: per method
the median ms/step in a window of 8 steps around each point, the end/start ratio (the target is within 1.5x at the
mid shape on CPU: attention over ~600 positions is small next to the MLPs at hidden 1024), and the whole run; last
line `end_over_start=X.XX` of the default `policy.sample`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch

from benchmarks.common import build_janus_size, machine_name
from benchmarks.rollout import PROMPTS, janus_generate
from policies.base import SamplingSettings


def step_times(run, model: torch.nn.Module) -> tuple[list[float], float]:
    """Seconds between consecutive forwards of `model` while `run()` executes, and the whole run's time."""
    stamps: list[float] = []
    handle = model.register_forward_hook(lambda *_: stamps.append(time.perf_counter()))
    start = time.perf_counter()
    try:
        run()
    finally:
        handle.remove()
    total = time.perf_counter() - start
    return [b - a for a, b in zip(stamps, stamps[1:])], total


def window_ms(times: list[float], at: int, width: int = 8) -> float:
    lo = max(0, min(at - width // 2, len(times) - width))
    return 1000 * statistics.median(times[lo:lo + width])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="mid", help="a Janus size of benchmarks/common.py (mid, cpu-bench, ...)")
    parser.add_argument("--batch", type=int, default=8, help="images (prompts x group)")
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    policy = build_janus_size(args.size, args.device, getattr(torch, args.dtype))
    prompts = (PROMPTS * args.batch)[: args.batch // args.group]
    settings = SamplingSettings(cfg_scale=args.cfg)
    first_layer = policy.decoder_layers()[0]
    steps = policy.num_image_tokens

    def sample(static: bool):
        def run():  # the decoding mode is set when the method runs, not when the table of methods is built
            policy.set_decoding(static_cache=static)
            try:
                return policy.sample(prompts, args.group, cfg_scale=args.cfg, temperature=1.0, top_k=0, top_p=1.0,
                                     generator=torch.Generator(args.device).manual_seed(0))
            finally:
                policy.set_decoding(static_cache=False)
        return run

    methods = {"policy.sample": sample(False), "policy.sample static": sample(True),
               "generate": lambda: janus_generate(policy, prompts, args.group, settings, 0)}
    print(f"janus {args.size}: {args.batch} images x {steps} tokens, CFG {args.cfg} ({2 * args.batch} rows), "
          f"{args.dtype}, {args.device} ({machine_name(torch.device(args.device))}), {torch.get_num_threads()} threads")
    points = {"t=0": 1, "t=T/4": steps // 4, "t=T/2": steps // 2, "t=T-1": steps - 2}
    print(f"{'method':22s}" + "".join(f"{k:>10s}" for k in points) + f"{'end/start':>11s}{'total s':>9s}")
    growth = {}
    for name, run in methods.items():
        times, total = step_times(run, first_layer)
        ms = [window_ms(times, at) for at in points.values()]
        growth[name] = ms[-1] / ms[0]
        print(f"{name:22s}" + "".join(f"{m:10.1f}" for m in ms) + f"{growth[name]:11.2f}{total:9.1f}")
    print(f"end_over_start={growth['policy.sample']:.2f}")


if __name__ == "__main__":
    main()
