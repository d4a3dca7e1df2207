"""The GPU run, prepared: `python benchmarks/gpu_suite.py` on a machine with a CUDA GPU.

Builds Janus-Pro-1B and -7B (random weights, the released architectures, bf16) and measures, each part a
subprocess of the benchmarks that already exist so that one failure does not hide the others:
- rollout images/s of the engine against transformers' `generate`, 16 prompts x G 8 with CFG, and the fraction of
  the HBM roofline (benchmarks/rollout.py, static cache + compiled decode step). Janus-Pro-7B attends with 32 full
  KV heads over 30 layers: 480 KiB of bf16 cache per position and row, so 16 x 8 images with CFG (256 rows of ~600
  positions) need 70 GiB of KV cache besides 14 GiB of weights, more than an 80 GB H100 has; `--fit-memory` then
  halves the batch until it fits (64 images there) and the summary's `images=` says which was measured. The
  issue's 7B shape needs a GPU with more memory (an H200's 141 GB);
- one GRPO step of Janus-Pro-7B with LoRA and G 16: its time split and peak memory (benchmarks/grpo_step.py).
Every part's output is printed as it comes; the last line is the summary, `gpu_suite ...`. Each part's
`cudagraph_skips` there should be 0: a compiled step that inductor ran without its CUDA graph is slower and raises no
error (the reason inductor gives is printed on stderr).

`--tiny` runs the same parts, with the same flags, on the tiny test model on the CPU (the compiled decode step as
inductor's C++ kernels there): the test suite runs it, so that the script does not fail on its first GPU run for a
reason a CPU can find.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# (name, script, arguments) on a GPU; the budget of the whole suite is 10 minutes
GPU_PARTS = [
    ("rollout_1b", "rollout.py", ["--policy", "janus", "--size", "Janus-Pro-1B", "--batch", "128", "--group", "8",
                                  "--cfg", "5", "--repeats", "1", "--compile", "--fit-memory"]),
    ("rollout_7b", "rollout.py", ["--policy", "janus", "--size", "Janus-Pro-7B", "--batch", "128", "--group", "8",
                                  "--cfg", "5", "--repeats", "1", "--compile", "--fit-memory"]),
    ("grpo_step_7b", "grpo_step.py", ["--policy", "janus", "--size", "Janus-Pro-7B", "--group", "16", "--prompts",
                                      "1", "--micro-batch", "4", "--gradient-checkpointing", "--static-cache",
                                      "--compile", "--steps", "1"]),
]
TINY_PARTS = [
    ("rollout_tiny", "rollout.py", ["--policy", "janus", "--tiny", "--batch", "4", "--group", "2", "--cfg", "5",
                                    "--repeats", "1", "--compile", "--fit-memory", "--device", "cpu"]),
    ("grpo_step_tiny", "grpo_step.py", ["--policy", "janus", "--tiny", "--group", "4", "--prompts", "1",
                                        "--micro-batch", "2", "--gradient-checkpointing", "--static-cache",
                                        "--compile", "--steps", "1", "--device", "cpu"]),
]


def figures(output: str) -> dict[str, str]:
    """The `key=value` lines a benchmark prints, and the best roofline fraction of its table (rollout)."""
    found = dict(re.findall(r"^([a-z_]+)=(\S+)$", output, re.M))
    roofline = [float(x) for x in re.findall(r"^sample\S* .* (\d+(?:\.\d+)?)%$", output, re.M)]
    if roofline:
        found["roofline"] = f"{max(roofline):.0f}%"
    return found


def run_part(name: str, script: str, arguments: list[str], timeout: float) -> tuple[dict[str, str], str | None]:
    """One benchmark as a subprocess, its output passed through; (figures, error or None)."""
    print(f"== {name}: python benchmarks/{script} {' '.join(arguments)}", flush=True)
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, str(HERE / script), *arguments], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {}, f"timed out after {timeout:.0f} s"
    print(done.stdout, end="", flush=True)
    print(f"== {name}: {time.perf_counter() - start:.0f} s", flush=True)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        return {}, f"exit {done.returncode}"
    # inductor gives the reason of a skipped CUDA graph only as a warning: keep it beside the count
    for line in done.stderr.splitlines():
        if "cudagraph" in line.lower():
            print(f"   {line}", file=sys.stderr)
    return figures(done.stdout), None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (what the tests run)")
    parser.add_argument("--part-timeout", type=float, default=240.0, help="seconds each part may take")
    args = parser.parse_args(argv)
    if not args.tiny:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU here: the suite measures GPU figures (use --tiny to check it on a CPU)")
    summary, failures = [], []
    for name, script, arguments in TINY_PARTS if args.tiny else GPU_PARTS:
        found, error = run_part(name, script, arguments, args.part_timeout)
        if error is not None:
            failures.append(f"{name} ({error})")
            continue
        keys = (("images", "speedup_vs_generate", "roofline") if script == "rollout.py"
                else ("step_seconds", "peak_memory_mib")) + ("cudagraph_skips",)
        summary.append(f"{name}: " + " ".join(f"{k}={found.get(k, '?')}" for k in keys))
    line = "gpu_suite " + "; ".join(summary)
    if failures:
        line += "; failed: " + ", ".join(failures)
    print(line)
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
