"""The GRPO recipe. `grpo_step` is the whole algorithm, top to bottom: sample, decode, reward, advantages, loss,
update. `train` sets up the pieces chosen by the config and loops over steps. Nothing here knows which model
family it trains: it talks to a `policies.Policy` and a `rewards.Reward`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from PIL import Image
from tqdm.auto import tqdm
from transformers import get_scheduler
from trl.trainer.utils import disable_dropout_in_model

import policies
import rewards
from grpo_img.checkpoint import (find_checkpoint, load_adapter, load_trainer_state, resume_changes, saved_config,
                                 save_checkpoint)
from grpo_img.config import GRPOImgConfig, save_config
from grpo_img.data import PromptRecord, PromptSchedule, load_prompts
from grpo_img.evaluate import Sampling, evaluate, reward_benchmark
from grpo_img.loss import (LossNormalizer, LossSettings, group_advantages, grpo_loss, high_entropy_mask,
                           normalize_then_sum_advantages, zero_variance_groups)
from grpo_img.reporting import MetricsLog, read_metrics, save_samples
from grpo_img import tracking
from grpo_img.report import plot_rewards, write_report
from grpo_img.distributed import (broadcast_trainable, check_distributed_type, gather_for_saving, shard_for_training,
                                  sync_gradients)
from grpo_img.sharding import clip_grad_norm, kept_gathered, load_full_optimizer_state
from policies.base import Policy, Rollout, concat_rollouts
from rewards.base import Reward, score_with_isolation

log = logging.getLogger("grpo_img")


class SetupError(ValueError):
    """Bad input found before any model was built (prompts, output folder, resume): the command line prints it as
    one line."""


@dataclass
class RunState:
    """Counters that must survive a resume."""

    nonfinite_in_a_row: int = 0
    reward_failures_in_a_row: int = 0
    # adaptive entropy control (use_adaptive_entropy): the coefficient now (None: entropy_coef) and the trained
    # tokens' mean entropy over all processes at the last update (inf: no bonus before the first measurement)
    entropy_coef: float | None = None
    last_world_entropy: float = math.inf


def grpo_step(
    step: int,
    policy: Policy,
    reward_fn: Reward,
    batch: list[PromptRecord],
    optimizer: torch.optim.Optimizer,
    scheduler,
    config: GRPOImgConfig,
    accelerator: Accelerator,
    state: RunState,
    more_prompts: Callable[[int], list[PromptRecord]] | None = None,
) -> tuple[dict, Rollout, list[Image.Image], torch.Tensor]:
    start = time.perf_counter()
    group_size = config.num_generations
    seconds = {"sample": 0.0, "decode": 0.0, "reward": 0.0}

    # 1-3. Sample G token sequences per prompt (with the log-probs of the distribution sampled from), decode them
    #      to pixels, reward them. Samples that cannot be scored are NaN and leave the loss. With dynamic sampling,
    #      groups whose rewards do not differ are replaced by groups of further prompts (`more_prompts(round)`).
    generator = torch.Generator(accelerator.device).manual_seed(
        config.seed * 1_000_003 + step * accelerator.num_processes + accelerator.process_index)
    scored_batch = sample_and_score(policy, reward_fn, batch, config, accelerator, generator, seconds)
    sampling_stats = {}
    if more_prompts is not None:
        scored_batch, sampling_stats = keep_informative_groups(scored_batch, more_prompts, policy, reward_fn, config,
                                                               accelerator, generator, seconds)
    rollout, images, reward_values = scored_batch.rollout, scored_batch.images, scored_batch.rewards
    reward_failures = scored_batch.failures
    prompts = [record.prompt for record in scored_batch.records]
    scored = ~torch.isnan(reward_values)
    state.reward_failures_in_a_row = 0 if scored.any() else state.reward_failures_in_a_row + 1
    # decided together (as the non-finite stop is): a process that stopped alone would leave the others waiting
    # in the next collective forever
    failures = accelerator.gather(torch.tensor([state.reward_failures_in_a_row], device=accelerator.device))
    if int(failures.max()) >= config.max_reward_failure_steps:
        failing = [rank for rank, count in enumerate(failures.tolist()) if count >= config.max_reward_failure_steps]
        raise RuntimeError(f"the reward could not score any sample for {int(failures.max())} steps in a row (on "
                           f"process(es) {failing} of {accelerator.num_processes}); see the warnings above for its "
                           "errors")
    t_reward = time.perf_counter()

    # 4. Group-relative advantages.
    device = rollout.completion_ids.device

    def reduce(t: torch.Tensor) -> torch.Tensor:  # batch statistics are over every process's samples
        return accelerator.reduce(t.to(accelerator.device), "sum").cpu()

    if config.multi_objective_aggregation == "normalize_then_sum":
        names = list(reward_fn.parts)
        parts = torch.stack([scored_batch.parts[name] for name in names], dim=1)
        parts[torch.isnan(reward_values)] = float("nan")  # unscored in the sum (a part failed) stays unscored
        weights = torch.tensor([reward_fn.parts[name][1] for name in names])
        advantages = normalize_then_sum_advantages(parts, weights, group_size, reduce).to(device)
    else:
        advantages = group_advantages(reward_values, group_size, config.scale_rewards, reduce).to(device)
    action_mask = rollout.action_mask & scored.to(device)[:, None]

    # 5. Log-probs of the policy before the update (only needed when it changes within this rollout batch) and of
    #    the reference policy (the same model with the adapter off).
    policy.model.train()  # dropout is disabled at set-up; train mode only turns gradient checkpointing on
    micro = config.per_device_train_batch_size
    updates_per_rollout = config.steps_per_generation // config.gradient_accumulation_steps
    needs_old = config.num_iterations > 1 or updates_per_rollout > 1
    with torch.no_grad(), accelerator.autocast():
        old_logprobs = _score_all(policy, rollout, config.cfg_mode, micro) if needs_old else None
        ref_logprobs = None
        if config.beta != 0.0:
            with policy.reference():
                ref_logprobs = _score_all(policy, rollout, config.cfg_mode, micro)

    # 6. Policy loss and updates: steps_per_generation micro-batches per pass, one optimizer update per
    #    gradient_accumulation_steps micro-batches, num_iterations passes.
    params = [p for group in optimizer.param_groups for p in group["params"]]
    settings = config.loss_settings()
    sums = {"loss": 0.0, "kl_sum": 0.0, "clipped_sum": 0.0, "tokens": 0.0, "entropy_sum": 0.0, "gap_sum": 0.0,
            "gap_tokens": 0.0, "drift_sum": 0.0, "grad_norm": 0.0}
    if old_logprobs is not None:  # the first scoring of this rollout: the sampler/scorer mismatch is measured here
        sums["gap_sum"] = float(((old_logprobs - rollout.logprobs).abs() * action_mask).sum())
        sums["gap_tokens"] = float(action_mask.sum())
    updates, skipped, empty_updates, optimizer_seconds = 0, 0, 0, 0.0
    for _ in range(config.num_iterations):
        for window in range(updates_per_rollout):
            rows = [torch.arange(start_row, start_row + micro, device=device)
                    for start_row in range(window * micro * config.gradient_accumulation_steps,
                                           (window + 1) * micro * config.gradient_accumulation_steps, micro)]
            if config.use_adaptive_entropy:  # the bonus applies only while entropy is at or below the target
                coef = config.entropy_coef if state.entropy_coef is None else state.entropy_coef
                settings = replace(settings, entropy_coef=coef if state.last_world_entropy <= config.entropy_target
                                   else 0.0)
            window_loss = window_backward(policy, rollout, rows, action_mask, advantages, old_logprobs,
                                          ref_logprobs, config, accelerator, sums, settings)
            if sums["window_tokens"] == 0:  # nothing scored on any process: no update (Adam's momentum would
                optimizer.zero_grad(set_to_none=True)  # still move the adapter), no scheduler step
                sums.pop("window_entropy_sum", None)
                sums.pop("window_trained", None)
                empty_updates += 1
                continue
            if config.use_adaptive_entropy:
                adapt_entropy_coef(state, config, accelerator, sums)
            # every process takes the same decision, so that the all-reduce below is entered by all or by none
            total_loss = accelerator.reduce(window_loss, "sum")
            finite = torch.isfinite(total_loss).item()
            if finite:
                sync_gradients(params, accelerator)
                grad_norm = clip_grad_norm(params, config.max_grad_norm)  # sharded or not
                finite = bool(torch.isfinite(grad_norm))
            if finite:
                t_optimizer = time.perf_counter()
                optimizer.step()
                scheduler.step()
                optimizer_seconds += time.perf_counter() - t_optimizer
                updates += 1
                sums["loss"] += total_loss.item() / accelerator.num_processes  # the loss of all processes' window
                sums["grad_norm"] += grad_norm.item()
            else:
                skipped += 1
            optimizer.zero_grad(set_to_none=True)

    if skipped:
        state.nonfinite_in_a_row += 1
        log.warning("step %d: %d update(s) skipped because the loss or gradient was not finite (%d step(s) in a "
                    "row)", step, skipped, state.nonfinite_in_a_row)
        if state.nonfinite_in_a_row >= config.max_nonfinite_steps:
            raise RuntimeError(f"non-finite loss in {state.nonfinite_in_a_row} steps in a row; stopping. Lower the "
                               "learning rate, or check the reward values and top_k/top_p settings")
    else:
        state.nonfinite_in_a_row = 0
    end = time.perf_counter()

    # 7. Metrics (this process's view; rewards are per process because groups never cross processes).
    tokens = max(sums["tokens"], 1.0)
    finite_rewards = reward_values[scored]
    per_prompt = {}
    for g, prompt in enumerate(prompts):
        group = reward_values[g * group_size:(g + 1) * group_size]
        per_prompt[prompt] = float(torch.nanmean(group)) if (~torch.isnan(group)).any() else math.nan
    metrics = {
        "step": step + 1,
        "reward_mean": float(finite_rewards.mean()) if len(finite_rewards) else math.nan,
        "reward_std": float(finite_rewards.std()) if len(finite_rewards) > 1 else 0.0,
        "kl": sums["kl_sum"] / tokens,
        "loss": sums["loss"] / max(updates, 1) if updates else math.nan,
        "entropy": sums["entropy_sum"] / tokens,
        "clip_ratio": sums["clipped_sum"] / tokens,
        "grad_norm": sums["grad_norm"] / max(updates, 1),
        "learning_rate": scheduler.get_last_lr()[0],  # of the LoRA group
        # |scored - sampled| log-prob at the first scoring of the rollout, before any update: ~0 in "mixture" mode,
        # the off-policy gap in "conditional" mode
        "logprob_gap": sums["gap_sum"] / max(sums["gap_tokens"], 1.0),
        # |scored - before-update| log-prob over the passes (0 when each rollout gets one update)
        "policy_drift": sums["drift_sum"] / tokens,
        "zero_std_groups": float(zero_variance_groups(reward_values, group_size).float().mean()),
        "reward_failures": reward_failures,
        "skipped_updates": skipped,
        "unscored_updates_skipped": empty_updates,  # windows without a scored action token on any process
        "step_seconds": end - start,
        "sample_seconds": seconds["sample"],
        "decode_seconds": seconds["decode"],
        "reward_seconds": seconds["reward"],
        "update_seconds": end - t_reward,
        "optimizer_seconds": optimizer_seconds,
    }
    metrics.update(sampling_stats)
    if config.top_entropy_quantile < 1.0:
        metrics["trained_token_fraction"] = sums.get("trained_tokens", 0.0) / tokens
    if config.use_adaptive_entropy:
        metrics["entropy_coef"] = state.entropy_coef
    for part, values in scored_batch.parts.items():
        metrics[f"reward/{part}"] = float(torch.nanmean(values))
    for part, failures in getattr(reward_fn, "last_failures", {}).items():
        metrics[f"reward_failures/{part}"] = failures
    metrics["reward_per_prompt"] = per_prompt
    return metrics, rollout, images, reward_values


@dataclass
class ScoredBatch:
    """Rollouts with their images and rewards (NaN: unscored), and the prompt record of each group."""

    rollout: Rollout
    images: list[Image.Image]
    rewards: torch.Tensor
    failures: int
    records: list[PromptRecord]
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # each reward part's scores (WeightedSum)


def sample_and_score(policy: Policy, reward_fn: Reward, records: list[PromptRecord], config: GRPOImgConfig,
                     accelerator: Accelerator, generator: torch.Generator, seconds: dict) -> ScoredBatch:
    """Sample G images per prompt, decode and reward them (a think-then-draw plan reaches the reward as
    metadata["plan"]); the time of each part is added to `seconds`.

    With `rollout_chunks` > 1 the prompts are sampled in that many parts, and each part is decoded and rewarded in
    a background thread (on its own CUDA stream) while the next part samples: the decoder and the reward model then
    work while the language model does. Sampling stays in order on the one generator, so a run is reproducible;
    its tokens differ from an unchunked run's (the generator is drawn in another order), the distribution does not.
    `seconds["decode"]` and `["reward"]` are then the background thread's time, partly hidden behind sampling."""
    parts = _split_evenly(records, config.rollout_chunks)
    if len(parts) == 1:
        rollout = sample_rollout(policy, records, config, accelerator, generator, seconds)
        return decode_and_score(policy, reward_fn, rollout, records, config, seconds)
    side_stream = torch.cuda.Stream(accelerator.device) if accelerator.device.type == "cuda" else None
    background_seconds = {"decode": 0.0, "reward": 0.0}

    def in_background(rollout: Rollout, part: list[PromptRecord], images: list | None, ready) -> ScoredBatch:
        with torch.no_grad(), (torch.cuda.stream(side_stream) if side_stream is not None else contextlib.nullcontext()):
            if ready is not None:
                side_stream.wait_event(ready)  # the part's tokens are written by the sampling stream
            return decode_and_score(policy, reward_fn, rollout, part, config, background_seconds, images)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode-and-reward") as pool:
        pending = []
        for part in parts:
            rollout = sample_rollout(policy, part, config, accelerator, generator, seconds)
            images = None
            # a decode that runs the language model (it may toggle the adapter), or any decode under FSDP (layers
            # are gathered and resharded while sampling), stays on this thread; the reward still overlaps
            if policy.decode_reads_language_model or policy.lockstep:
                t0 = time.perf_counter()
                images = policy.decode(rollout)
                seconds["decode"] += time.perf_counter() - t0
            ready = torch.cuda.Event() if side_stream is not None else None
            if ready is not None:
                ready.record()
            pending.append(pool.submit(in_background, rollout, part, images, ready))
        scored = [future.result() for future in pending]
    seconds["decode"] += background_seconds["decode"]
    seconds["reward"] += background_seconds["reward"]
    return ScoredBatch(
        concat_rollouts([s.rollout for s in scored]), [image for s in scored for image in s.images],
        torch.cat([s.rewards for s in scored]), sum(s.failures for s in scored), [r for s in scored for r in s.records],
        {name: torch.cat([s.parts[name] for s in scored]) for name in scored[0].parts})


def _split_evenly(records: list[PromptRecord], parts: int) -> list[list[PromptRecord]]:
    """`records` in `parts` consecutive runs whose sizes differ by at most one (fewer when there are fewer)."""
    parts = max(1, min(parts, len(records)))
    size, extra = divmod(len(records), parts)
    bounds = [i * size + min(i, extra) for i in range(parts + 1)]
    return [records[a:b] for a, b in zip(bounds, bounds[1:])]


def sample_rollout(policy: Policy, records: list[PromptRecord], config: GRPOImgConfig, accelerator: Accelerator,
                   generator: torch.Generator, seconds: dict) -> Rollout:
    """G samples per prompt, timed into `seconds["sample"]`."""
    t0 = time.perf_counter()
    policy.model.eval()
    with accelerator.autocast(), kept_gathered(policy.model, config.fsdp_gather_for_sampling):
        rollout = policy.sample([r.prompt for r in records], config.num_generations, cfg_scale=config.cfg_scale,
                                temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                                min_p=config.min_p, generator=generator)
    seconds["sample"] += time.perf_counter() - t0
    return rollout


def decode_and_score(policy: Policy, reward_fn: Reward, rollout: Rollout, records: list[PromptRecord],
                     config: GRPOImgConfig, seconds: dict, images: list[Image.Image] | None = None) -> ScoredBatch:
    """Pixels (unless `images` are given) and rewards of a rollout, timed into `seconds["decode"]` and
    `["reward"]`."""
    t1 = time.perf_counter()
    images = policy.decode(rollout) if images is None else images
    t2 = time.perf_counter()
    metadata = [record.metadata for record in records for _ in range(config.num_generations)]
    if rollout.plans is not None:
        metadata = [{**(meta or {}), "plan": plan} for meta, plan in zip(metadata, rollout.plans)]
    rewards, failures = score_with_isolation(reward_fn, images, rollout.prompts, metadata)
    parts = {name: torch.tensor(values, dtype=torch.float32)
             for name, values in getattr(reward_fn, "last_parts", {}).items()}
    seconds["decode"] += t2 - t1
    seconds["reward"] += time.perf_counter() - t2
    return ScoredBatch(rollout, images, rewards, failures, list(records), parts)


def keep_informative_groups(first: ScoredBatch, more_prompts: Callable[[int], list[PromptRecord]], policy: Policy,
                            reward_fn: Reward, config: GRPOImgConfig, accelerator: Accelerator,
                            generator: torch.Generator, seconds: dict) -> tuple[ScoredBatch, dict]:
    """Dynamic sampling (DAPO): keep the groups whose rewards differ, and sample rounds of further prompts until
    there are as many as the step's batch, at most `dynamic_sampling_max_rounds` extra rounds. Every process runs
    the same rounds (decided together: sampling may be collective under FSDP). Short of informative groups after
    the last round, the batch is filled up with the first round's uninformative groups (advantage 0: only the KL
    term moves them), and the metrics say how many."""
    group_size, needed = config.num_generations, len(first.records)
    rounds = [first]

    def informative(index: int) -> list[tuple[int, int]]:
        flat = ~zero_variance_groups(rounds[index].rewards, group_size)
        return [(index, int(g)) for g in flat.nonzero().flatten()]

    kept = informative(0)
    while len(rounds) <= config.dynamic_sampling_max_rounds:
        missing = torch.tensor([max(needed - len(kept), 0)], device=accelerator.device)
        if int(accelerator.gather(missing).max()) == 0:
            break
        rounds.append(sample_and_score(policy, reward_fn, more_prompts(len(rounds)), config, accelerator, generator,
                                       seconds))
        kept += informative(len(rounds) - 1)
    found = len(kept)
    kept = kept[:needed]
    filled = needed - len(kept)
    kept += [(0, g) for g in range(needed) if (0, g) not in kept][:filled]

    parts = []
    for index, group in kept:
        rows = torch.arange(group * group_size, (group + 1) * group_size)
        source = rounds[index]
        parts.append(ScoredBatch(source.rollout.select(rows), [source.images[i] for i in rows.tolist()],
                                 source.rewards[rows], 0, [source.records[group]],
                                 {name: values[rows] for name, values in source.parts.items()}))
    batch = ScoredBatch(concat_rollouts([p.rollout for p in parts]), [im for p in parts for im in p.images],
                        torch.cat([p.rewards for p in parts]), sum(r.failures for r in rounds),
                        [p.records[0] for p in parts],
                        {name: torch.cat([p.parts[name] for p in parts]) for name in first.parts})
    sampled_groups = needed * len(rounds)
    stats = {"dynamic_sampling_rounds": len(rounds) - 1,
             "dynamic_sampling_drop_rate": 1.0 - found / sampled_groups,
             "dynamic_sampling_filled_groups": filled}
    return batch, stats


def adapt_entropy_coef(state: RunState, config: GRPOImgConfig, accelerator: Accelerator, sums: dict) -> None:
    """Skywork-OR1's controller, as TRL runs it: after each update, the trained tokens' mean entropy over all
    processes moves the coefficient up by entropy_coef_delta when at or below entropy_target, down otherwise."""
    totals = accelerator.reduce(torch.tensor([sums.pop("window_entropy_sum"), sums.pop("window_trained")],
                                             device=accelerator.device), "sum")
    world_entropy = float(totals[0] / totals[1].clamp(min=1.0))
    coef = config.entropy_coef if state.entropy_coef is None else state.entropy_coef
    if world_entropy <= config.entropy_target:
        coef = min(coef + config.entropy_coef_delta, config.entropy_coef_max)
    else:
        coef = max(coef - config.entropy_coef_delta, config.entropy_coef_min)
    state.entropy_coef, state.last_world_entropy = coef, world_entropy


def window_backward(policy: Policy, rollout: Rollout, rows: list[torch.Tensor], action_mask: torch.Tensor,
                    advantages: torch.Tensor, old_logprobs: torch.Tensor | None, ref_logprobs: torch.Tensor | None,
                    config: GRPOImgConfig, accelerator: Accelerator, sums: dict,
                    settings: LossSettings | None = None) -> torch.Tensor:
    """Forward and backward over one optimizer window (the micro-batches `rows` of this process's rollout).

    Returns this process's share of the window's loss (detached); gradients accumulate in the parameters' .grad.
    The normaliser counts the window over all processes (see `LossNormalizer`), so that after `sync_gradients`
    averages the gradients, they equal those of one process holding every process's samples. `settings`: the
    loss settings (default: the config's).
    """
    settings = settings if settings is not None else config.loss_settings()
    entropy_grad = settings.entropy_coef != 0.0 or config.use_adaptive_entropy
    micro = len(rows[0])
    window_tokens = accelerator.reduce(action_mask[torch.cat(rows)].sum().float(), "sum").item()
    sums["window_tokens"] = window_tokens
    norm = LossNormalizer(sequences=float(micro * len(rows)), tokens=window_tokens / accelerator.num_processes,
                          micro_batches=len(rows), completion_length=rollout.completion_ids.shape[1])
    window_loss = torch.zeros((), device=action_mask.device)
    for index in rows:
        part = rollout.select(index)
        mask = action_mask[index]
        with accelerator.autocast():
            logprobs, entropy = policy.token_logprobs(part, config.cfg_mode, return_entropy=True,
                                                      entropy_grad=entropy_grad)
        logprobs, entropy = logprobs.float(), entropy.float()
        token_mask = None
        if config.top_entropy_quantile < 1.0:  # the quantile over this micro-batch of every process, as TRL
            token_mask = high_entropy_mask(entropy, mask, config.top_entropy_quantile,
                                           lambda x: gather_ragged(x, accelerator))
        trained = mask if token_mask is None else mask & token_mask
        entropy_tokens = None
        if settings.entropy_coef != 0.0:  # the bonus's normaliser counts this micro-batch over all processes
            entropy_tokens = accelerator.reduce(trained.sum().float(), "sum").item() / accelerator.num_processes
        loss, stats = grpo_loss(
            logprobs, old_logprobs[index] if old_logprobs is not None else logprobs.detach(), advantages[index],
            mask, settings=settings, norm=norm, ref_logprobs=ref_logprobs[index] if ref_logprobs is not None else None,
            entropy=entropy if entropy_grad else None, token_mask=token_mask, entropy_tokens=entropy_tokens)
        accelerator.backward(loss)
        window_loss += loss.detach()
        for key in ("kl_sum", "clipped_sum", "tokens"):
            sums[key] += stats[key].item()
        sums["entropy_sum"] += (entropy.detach() * mask).sum().item()
        trained_tokens = stats["trained_tokens"].item()
        sums["trained_tokens"] = sums.get("trained_tokens", 0.0) + trained_tokens
        if config.use_adaptive_entropy:  # the controller's window statistics (adapt_entropy_coef)
            sums["window_entropy_sum"] = sums.get("window_entropy_sum", 0.0) + \
                (entropy.detach() * trained).sum().item()
            sums["window_trained"] = sums.get("window_trained", 0.0) + trained_tokens
        if old_logprobs is None:  # one update per rollout: this is its first (and only) scoring
            sums["gap_sum"] += ((logprobs.detach() - part.logprobs).abs() * mask).sum().item()
            sums["gap_tokens"] += mask.sum().item()
        else:
            sums["drift_sum"] += ((logprobs.detach() - old_logprobs[index]).abs() * mask).sum().item()
    return window_loss


def gather_ragged(values: torch.Tensor, accelerator: Accelerator) -> torch.Tensor:
    """One 1-D tensor per process, of any lengths, concatenated (every process gets all of them)."""
    if accelerator.num_processes == 1:
        return values
    padded = accelerator.pad_across_processes(values, dim=0, pad_index=-1e9)  # entropies are never negative
    gathered = accelerator.gather(padded)
    return gathered[gathered != -1e9]


def _score_all(policy: Policy, rollout: Rollout, cfg_mode: str, micro_batch: int) -> torch.Tensor:
    parts = [policy.token_logprobs(rollout.select(slice(i, i + micro_batch)), cfg_mode).float()
             for i in range(0, len(rollout), micro_batch)]
    return torch.cat(parts)


def prepare_fresh_output_dir(output_dir: Path, overwrite: bool) -> None:
    """A fresh run needs an empty output folder: an old run's checkpoints would rotate out the new run's and a later
    --resume would continue the old run. A non-empty folder is refused, or cleared with `overwrite_output_dir`."""
    if output_dir.is_dir() and any(output_dir.iterdir()):
        held = sorted(p.name for p in output_dir.iterdir())
        if not overwrite:
            raise ValueError(f"output_dir {output_dir} is not empty ({', '.join(held[:5])}"
                             f"{', ...' if len(held) > 5 else ''}): continue that run with --resume, clear it with "
                             "--overwrite_output_dir true, or choose another output_dir")
        log.warning("overwrite_output_dir: clearing %s (%d entries)", output_dir, len(held))
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)


def apply_resume_changes(config: GRPOImgConfig, checkpoint: Path, output_dir: Path, accelerator: Accelerator) -> None:
    """Refuse a resume whose config would change the trajectory; apply and record the changes a resume may make
    (in the log and in output_dir/resumes.jsonl)."""
    saved = saved_config(checkpoint)
    if saved is None and (output_dir / "config.json").is_file():  # a checkpoint from before configs were kept in it
        saved = json.loads((output_dir / "config.json").read_text())
    step = int(checkpoint.name.split("-")[1])
    # compared as JSON reads both (the checkpoint keeps its config as JSON)
    changes = resume_changes(saved or {}, json.loads(json.dumps(config.to_dict(), default=str)), step)
    for key, (old, new) in changes.items():
        log.info("resume from %s: %s %r -> %r", checkpoint, key, old, new)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        with (output_dir / "resumes.jsonl").open("a") as f:
            f.write(json.dumps({"checkpoint": str(checkpoint), "step": step,
                                "changed": {k: {"from": o, "to": n} for k, (o, n) in changes.items()}},
                               default=str) + "\n")


def setup_policy(config: GRPOImgConfig, device: torch.device, policy: Policy | None = None) -> Policy:
    """The configured policy (or `policy`, already built, e.g. at a benchmark size) made ready to train: plan,
    LoRA adapter, no dropout, gradient checkpointing, on `device`."""
    policy = policy if policy is not None else policies.build(config.policy, **config.policy_options)
    if config.plan:
        policy.set_plan(config.plan_settings())
    policy.validate_for_training()  # e.g. SEED-X without a plan: every image token is forced, nothing to train
    policy.add_lora(r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                    train_image_heads=config.train_image_heads)
    disable_dropout_in_model(policy.model)  # dropout would make the first ratio differ from 1
    if config.gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    return policy.to(device)


def build_optimizer(policy: Policy, config: GRPOImgConfig) -> tuple[torch.optim.Optimizer, object]:
    """AdamW over the adapter and the image heads (each at its own learning rate) and its learning-rate schedule."""
    adapter_params, head_params = policy.trainable_parameters()
    param_groups = [{"params": adapter_params, "lr": config.learning_rate},
                    {"params": head_params, "lr": config.image_heads_learning_rate or config.learning_rate}]
    optimizer = torch.optim.AdamW([g for g in param_groups if g["params"]], betas=(config.adam_beta1, config.adam_beta2),
                                  eps=config.adam_epsilon, weight_decay=config.weight_decay)
    updates_per_step = config.num_iterations * config.steps_per_generation // config.gradient_accumulation_steps
    scheduler = get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=config.warmup_steps,
                              num_training_steps=config.max_steps * updates_per_step)
    return optimizer, scheduler


def train(config: GRPOImgConfig, resume: str | bool | None = None) -> Path:
    """Run GRPO as configured; returns the output directory."""
    use_bf16 = config.bf16 if config.bf16 is not None else torch.cuda.is_available()
    output_dir = Path(config.output_dir)
    trackers = tracking.report_to_names(config.report_to)
    try:
        tracking.check_installed(trackers)
    except ValueError as error:
        raise SetupError(str(error)) from error
    accelerator = Accelerator(mixed_precision="bf16" if use_bf16 else "no", log_with=trackers or None,
                              project_config=ProjectConfiguration(project_dir=str(output_dir),
                                                                  logging_dir=str(output_dir / "tensorboard")))
    sharding = check_distributed_type(accelerator)
    torch.manual_seed(config.seed)

    # Everything that can be wrong with the input is found before a model is built: the prompts, the sampling
    # settings (left unset: the family's release ones; from here on the config holds them explicitly), the output
    # folder, and on resume the checkpoint and how this config differs from its.
    try:
        records = load_prompts(config.prompts, config.prompt_column)
        if config.eval_prompts is not None:
            load_prompts(config.eval_prompts, config.prompt_column)
        config = config.with_sampling(policies.policy_class(config.policy).default_sampling.override(
            config.cfg_scale, config.temperature, config.top_k, config.top_p, config.min_p))
        checkpoint = find_checkpoint(output_dir, resume) if resume else None
        if checkpoint is not None:
            apply_resume_changes(config, checkpoint, output_dir, accelerator)
        elif accelerator.is_main_process:
            prepare_fresh_output_dir(output_dir, config.overwrite_output_dir)
    except (ValueError, FileNotFoundError) as error:
        raise SetupError(str(error)) from error
    accelerator.wait_for_everyone()
    log.info("sampling: cfg_scale %s, temperature %s, top_k %s, top_p %s, min_p %s", config.cfg_scale,
             config.temperature, config.top_k, config.top_p, config.min_p)

    schedule = PromptSchedule(records, config.prompts_per_step, config.seed, accelerator.process_index,
                              accelerator.num_processes)
    reward_fn = rewards.build_composite(config.rewards)
    policy = setup_policy(config, accelerator.device)
    policy.sampling_settings(config.cfg_scale)  # warns once if the family has no token-level guidance
    if accelerator.is_main_process:
        save_config(config, output_dir / "config.json")
    adapter_params, head_params = policy.trainable_parameters()
    broadcast_trainable(adapter_params + head_params, accelerator)
    if checkpoint is not None:
        load_adapter(checkpoint, policy.peft_model)  # into the full weights, before sharding
    shard_for_training(policy, sharding, accelerator)
    adapter_params, head_params = policy.trainable_parameters()
    log.info("policy %s: %d trainable parameters of %d", config.policy,
             sum(p.numel() for p in adapter_params + head_params), sum(p.numel() for p in policy.model.parameters()))
    optimizer, scheduler = build_optimizer(policy, config)
    optimizer = accelerator.prepare_optimizer(optimizer)

    state, start_step, run_id = RunState(), 0, tracking.new_run_id()
    if checkpoint is not None:
        load_optimizer = (lambda saved: load_full_optimizer_state(policy.peft_model, optimizer, saved)) \
            if sharding is not None else None
        saved = load_trainer_state(checkpoint, optimizer, scheduler, load_optimizer)
        start_step = saved["step"]
        state = RunState(**saved["run_state"])
        run_id = saved.get("tracker_run_id", run_id)  # the same W&B / trackio run continues
        log.info("resumed from %s at step %d", checkpoint, start_step)
    metrics_log = MetricsLog(output_dir, resume_step=start_step if resume else None) \
        if accelerator.is_main_process else None
    accelerator.init_trackers(config.tracker_project_name, config=tracking.hyperparameters(config.to_dict()),
                              init_kwargs=tracking.tracker_init_kwargs(trackers, output_dir, run_id,
                                                                       start_step if checkpoint else None))
    extra_state = lambda: {"run_state": vars(state).copy(), "tracker_run_id": run_id}  # noqa: E731

    # evaluation runs on the main process only, unless the layers are sharded: then every process must take part
    # in every forward (each samples the same images; process 0 logs)
    evaluates_here = accelerator.is_main_process or sharding is not None
    evaluation = setup_evaluation(config) if evaluates_here else None
    progress = tqdm(total=config.max_steps, initial=start_step, desc="GRPO", unit="step",
                    disable=not accelerator.is_main_process)
    for step in range(start_step, config.max_steps):
        batch = schedule.at_step(step)
        more_prompts = functools.partial(schedule.extra_at_step, step) if config.dynamic_sampling else None
        metrics, rollout, images, reward_values = grpo_step(step, policy, reward_fn, batch, optimizer, scheduler,
                                                            config, accelerator, state, more_prompts)
        done = step + 1
        evaluate_now = bool(config.eval_steps) and (done % config.eval_steps == 0 or done == config.max_steps)
        if evaluate_now and evaluates_here:  # unsharded, the other processes wait at the next collective
            eval_dir = output_dir / "eval" / f"step_{done:06d}" if accelerator.is_main_process else None
            with accelerator.autocast(), kept_gathered(policy.model, config.fsdp_gather_for_sampling):
                metrics.update(run_evaluation(policy, evaluation, config, eval_dir))
            if eval_dir is not None:
                tracking.log_images(accelerator, eval_grids(eval_dir), done)
        if accelerator.is_main_process:
            if done % config.logging_steps == 0 or done == config.max_steps or evaluate_now:
                metrics_log.log(metrics)
                accelerator.log(tracking.scalars(metrics), step=done)
            if config.image_log_steps and (done % config.image_log_steps == 0 or done == 1):
                samples = save_samples(output_dir, done, images, rollout.prompts, reward_values.tolist(),
                                       rollout.plans, config.num_generations)
                tracking.log_images(accelerator, samples, done)
        # no checkpoint while updates are being skipped: it must not rotate out the last good one
        if config.save_steps and done % config.save_steps == 0 and done < config.max_steps \
                and state.nonfinite_in_a_row == 0:
            accelerator.wait_for_everyone()
            adapter_state, optimizer_state = gather_for_saving(policy, optimizer, sharding)
            if accelerator.is_main_process:
                save_checkpoint(output_dir, done, policy.peft_model, optimizer, scheduler, extra_state(),
                                config.save_total_limit, adapter_state, optimizer_state, config.to_dict())
        progress.update(1)
        progress.set_postfix(reward_mean=f"{metrics['reward_mean']:.3f}", kl=f"{metrics['kl']:.4f}",
                             step_s=f"{metrics['step_seconds']:.1f}")
    progress.close()

    accelerator.wait_for_everyone()
    adapter_state, optimizer_state = gather_for_saving(policy, optimizer, sharding)
    if accelerator.is_main_process:
        save_checkpoint(output_dir, config.max_steps, policy.peft_model, optimizer, scheduler, extra_state(),
                        config.save_total_limit, adapter_state, optimizer_state, config.to_dict())
        policy.peft_model.save_pretrained(output_dir / "adapter", state_dict=adapter_state)
        try:  # the run is saved by now: a report that fails costs only the report
            report = write_report(output_dir)
            shutil.copyfile(report.parent / "figures" / "rewards.png", output_dir / "reward_curve.png")
        except Exception as error:  # noqa: BLE001
            log.warning("the run report could not be written (%s); the run itself is complete", error)
            report = None
            plot_rewards(read_metrics(output_dir), output_dir / "reward_curve.png")
        log.info("done: adapter in %s; report %s; reward curve %s%s", output_dir / "adapter", report,
                 output_dir / "reward_curve.png",
                 f"; tensorboard --logdir {output_dir / 'tensorboard'}" if "tensorboard" in trackers else "")
        for tracker in accelerator.trackers:  # (not accelerator.end_training: it would end the process group too)
            tracker.finish()
    return output_dir


def setup_evaluation(config: GRPOImgConfig):
    """The held-out benchmark for eval_steps (None when evaluation is off)."""
    if not config.eval_steps:
        return None
    return reward_benchmark(config.eval_rewards or config.rewards, load_prompts(config.eval_prompts,
                                                                                 config.prompt_column))


def run_evaluation(policy: Policy, benchmark, config: GRPOImgConfig, out_dir: Path | None = None) -> dict:
    """eval/METRIC (mean over all images) and, with several tasks, eval/TASK/METRIC. Same seed at every
    evaluation, so the curve compares the policy on the same draws of noise. With `out_dir` (the main process),
    the images, report and grids are written there (an earlier evaluation's folder of this step, left by an
    interrupted run, is replaced)."""
    start = time.perf_counter()
    if out_dir is not None:
        shutil.rmtree(out_dir, ignore_errors=True)
    report = evaluate(policy, benchmark, out_dir, num_images=config.eval_num_images,
                      prompts_per_batch=max(1, config.per_device_train_batch_size // config.eval_num_images),
                      sampling=Sampling(config.cfg_scale, config.temperature, config.top_k, config.top_p, config.min_p),
                      seed=config.seed, progress=False)
    metrics = {f"eval/{key}": value for key, value in report["image_means"].items()}
    if len(report["tasks"]) > 1:
        for task, means in report["tasks"].items():
            metrics.update({f"eval/{task}/{key}": value for key, value in means.items()})
    metrics["eval_seconds"] = time.perf_counter() - start
    return metrics


def eval_grids(eval_dir: Path) -> dict[str, tuple[Image.Image, str]]:
    """The task grids an evaluation wrote ({tag: (grid, caption)}) for the trackers."""
    return {f"eval/{path.stem}": (Image.open(path).convert("RGB"), f"evaluation grid {path.stem}")
            for path in sorted((eval_dir / "grids").glob("*.png"))}
