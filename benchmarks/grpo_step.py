"""One GRPO step's time split and peak memory, through the trainer's own `grpo_step`.

With `--rollout-chunks N` decoding and rewards overlap with sampling (the trainer's `rollout_chunks`): then the
decode and reward figures are the background thread's and overlap the sample figure; the step time is the measure.

    python benchmarks/grpo_step.py --policy janus --tiny --group 8 --prompts 2
    python benchmarks/grpo_step.py --policy janus --size Janus-Pro-7B --group 16 --prompts 1 \
        --micro-batch 4 --gradient-checkpointing    # GPU: the "LoRA GRPO step with G=16 fits in 80 GB" check

The split (sample, decode, reward, update) is the one `grpo_step` records in its metrics; the update is cut further
into scoring forward (every `policy.token_logprobs` call of the step, reference pass included, timed around each
call: `ScoringTimer`), backward (the rest), and optimizer (the trainer's own figure). Peak memory is over the whole
step. Last line: `step_seconds=X.XX`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch
from accelerate import Accelerator

import policies
import rewards
from benchmarks.common import PeakMemory, cudagraph_skips, machine_name, sync
from benchmarks.rollout import FAMILIES, PROMPTS
from grpo_img.config import load_config
from grpo_img.data import PromptRecord
from grpo_img.trainer import RunState, build_optimizer, grpo_step, setup_policy
from policies.base import decode_compile_mode


class ScoringTimer:
    """Seconds spent in the step's own `policy.token_logprobs` calls (the scoring forwards, the reference pass
    included), timed around each call on the policy instance, with a device sync on either side so that the
    forward's kernels are counted in it and not in the backward that follows.

    Timing a second, separate pass instead (as this script did) made the split depend on noise: at tiny sizes the
    separate forward could take longer than the step's own, and backward, the rest, came out negative."""

    def __init__(self, policy, device: torch.device) -> None:
        self.policy, self.device, self.seconds = policy, device, 0.0

    def __enter__(self) -> "ScoringTimer":
        score = self.policy.token_logprobs  # the bound method, before the instance attribute hides it

        def timed(*args, **kwargs):
            sync(self.device)
            start = time.perf_counter()
            try:
                return score(*args, **kwargs)
            finally:
                sync(self.device)
                self.seconds += time.perf_counter() - start

        self.policy.token_logprobs = timed
        return self

    def __exit__(self, *exc) -> None:
        del self.policy.token_logprobs  # back to the class's method


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", default="janus")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--tiny", action="store_true", help="the family's tiny test model (default)")
    which.add_argument("--size", help="a released architecture with random weights (see benchmarks/rollout.py)")
    parser.add_argument("--group", type=int, default=8, help="G, samples per prompt")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step")
    parser.add_argument("--micro-batch", type=int, default=None, help="samples per forward/backward (default: all)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--beta", type=float, default=0.04, help="KL weight (0 skips the reference pass)")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--cfg", type=float, default=5.0)
    parser.add_argument("--static-cache", action="store_true", help="sample with the static-cache decode loop")
    parser.add_argument("--compile", action="store_true", help="and a compiled decode step (CUDA graphs on CUDA)")
    parser.add_argument("--rollout-chunks", type=int, default=1,
                        help="sample in this many parts, decoding and rewarding each while the next samples")
    parser.add_argument("--steps", type=int, default=2, help="measured steps (after one warm-up step)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    if args.policy not in policies.available():
        raise SystemExit(f"unknown policy {args.policy!r}; available: {', '.join(policies.available())}")
    device = torch.device(args.device)
    n = args.group * args.prompts
    micro = args.micro_batch or n
    if n % micro:
        raise SystemExit(f"--micro-batch ({micro}) must divide the rollout ({n} samples)")
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(None, {
            "policy": args.policy, "num_generations": str(args.group),
            "per_device_train_batch_size": str(micro), "gradient_accumulation_steps": str(n // micro),
            "beta": str(args.beta), "lora_r": str(args.lora_r), "cfg_scale": str(args.cfg),
            "gradient_checkpointing": str(args.gradient_checkpointing).lower(), "output_dir": tmp,
            "report_to": "none", "rollout_chunks": str(args.rollout_chunks)})
    accelerator = Accelerator(mixed_precision="bf16" if device.type == "cuda" else "no", cpu=device.type == "cpu")

    # The trainer's own builders, with the model built by size where asked.
    if args.size is None:
        policy = policies.build(args.policy, tiny=True)
    else:
        family = FAMILIES.get(args.policy)
        if family is None or family.build_size is None:
            raise SystemExit(f"--size is not available for {args.policy} yet; use --tiny")
        if args.size not in family.sizes:
            raise SystemExit(f"unknown --size {args.size!r}; known: {', '.join(family.sizes)}")
        policy = family.build_size(args.size, str(device), torch.bfloat16 if device.type == "cuda" else torch.float32)
    policy.set_decoding(static_cache=args.static_cache, compile_decode=args.compile)
    policy = setup_policy(config, device, policy)
    optimizer, scheduler = build_optimizer(policy, config)
    optimizer = accelerator.prepare_optimizer(optimizer)
    reward_fn = rewards.build_composite(config.rewards)
    batch = [PromptRecord(PROMPTS[i % len(PROMPTS)], {"color": "red"}) for i in range(args.prompts)]

    state = RunState()
    splits = []
    with PeakMemory(device) as memory:
        for step in range(args.steps + 1):
            with ScoringTimer(policy, device) as scoring:
                metrics, *_ = grpo_step(step, policy, reward_fn, batch, optimizer, scheduler, config, accelerator,
                                        state)
            if step > 0:  # the first step warms up allocators (and compiles, with --compile)
                forward = scoring.seconds
                splits.append(dict(
                    sample=metrics["sample_seconds"], decode=metrics["decode_seconds"],
                    reward=metrics["reward_seconds"], scoring_forward=forward,
                    backward=metrics["update_seconds"] - forward - metrics["optimizer_seconds"],
                    optimizer=metrics["optimizer_seconds"], step=metrics["step_seconds"]))
    mean = {k: sum(s[k] for s in splits) / len(splits) for k in splits[0]}
    adapter, heads = policy.trainable_parameters()

    params = sum(p.numel() for p in policy.model.parameters())
    trainable = sum(p.numel() for p in adapter + heads)
    print(f"machine: {machine_name(device)}")
    print(f"policy={args.policy} size={args.size or 'tiny'} params={params / 1e6:.1f}M "
          f"trainable={trainable / 1e6:.2f}M "
          f"prompts={args.prompts} group={args.group} micro_batch={micro} beta={args.beta} cfg={args.cfg} "
          f"gradient_checkpointing={args.gradient_checkpointing} rollout_chunks={args.rollout_chunks} "
          f"tokens_per_image={policy.num_completion_tokens}")
    print(f"{'part':<18}{'seconds':>10}{'share':>8}")
    for key in ("sample", "decode", "reward", "scoring_forward", "backward", "optimizer"):
        print(f"{key:<18}{mean[key]:>10.3f}{mean[key] / mean['step']:>8.1%}")
    print(f"peak_memory_mib={memory.peak_bytes / 2**20:.0f}")
    compile_mode = decode_compile_mode(device, args.static_cache) if args.compile else None
    print(f"cudagraph_skips={cudagraph_skips(compile_mode)}")
    print(f"step_seconds={mean['step']:.2f}")
    return {"split": mean, "peak_bytes": memory.peak_bytes}


if __name__ == "__main__":
    main()
