"""Run under `accelerate launch` by tests/test_multiprocess.py (not a test module itself):

    accelerate launch --config_file configs/accelerate/multi_cpu.yaml tests/multiproc_check.py OUT_DIR
    accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 tests/multiproc_check.py OUT_DIR

(the second with ACCELERATE_USE_CPU=true: FSDP2 over gloo, the decoder layers sharded by the trainer.)

Every process writes OUT_DIR/rank{R}.pt with
- "fixed": for one fixed rollout batch of every process's samples, per loss type, the loss of the window (the mean
  of the processes' shares) and the gradients after `sync_gradients`, computed by the trainer's own
  `window_backward` on this process's whole groups;
- "initial", "trained": every parameter of the policy before and after `train()` ran a few steps on this many
  processes (gathered to full tensors where sharded);
- under FSDP also "sharded" (names of the parameters FSDP sharded), "resumed": every parameter after a second
  `train()` that resumed from the run's mid-way checkpoint and ran to the same end, and in "fixed"
  "gathered_sampling_equal": whether sampling with the layers kept gathered drew the same tokens. The FSDP runs
  sample with `fsdp_gather_for_sampling`, evaluate after the last step and save a mid-way checkpoint.
The test computes the same "fixed" numbers in one process over the union of the samples (`fixed_batch(...)`) and
compares.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

PROMPTS = ["a red image", "a green image", "a blue image", "a yellow image"]
GROUP = 4
STEPS = 3
# loss settings compared between 2 processes and 1 (bnpo is per micro-batch by definition, as in TRL: see README)
LOSS_CASES = {
    "grpo": {}, "dapo": {"loss_type": "dapo"}, "dr_grpo": {"loss_type": "dr_grpo"},
    "cispo": {"loss_type": "cispo", "epsilon_high": 5.0}, "sapo": {"loss_type": "sapo"},
    "luspo": {"loss_type": "luspo", "importance_sampling_level": "sequence"}, "vespo": {"loss_type": "vespo"},
    "gspo_bias_kl": {"importance_sampling_level": "sequence", "use_bias_correction_kl": True},
    "top_entropy_bonus": {"loss_type": "dapo", "top_entropy_quantile": 0.3, "entropy_coef": 0.01},
}
UNSCORED = (0, 1, 2, 9)  # samples whose reward "failed": uneven token counts across processes


def check_config(num_processes: int, output_dir: str, **overrides):
    """The tiny demo policy without the palette fit (its build is 20 s slower) on 4 prompts x 4 samples per step
    in total, split evenly over the processes."""
    from grpo_img.config import GRPOImgConfig

    values = dict(policy="janus", policy_options={"tiny": True}, rewards=[{"name": "color"}], prompts=PROMPTS,
                  num_generations=GROUP, per_device_train_batch_size=len(PROMPTS) * GROUP // num_processes,
                  loss_type="grpo", beta=0.04, learning_rate=3e-3, image_heads_learning_rate=1e-2, max_steps=STEPS,
                  lora_r=4, lora_alpha=8, seed=0, output_dir=output_dir, image_log_steps=0, save_steps=0,
                  report_to="none")
    values.update(overrides)
    config = GRPOImgConfig(**values)
    config.validate()
    return config


def fixed_batch(accelerator) -> dict:
    """Loss and synchronised gradients of one fixed rollout batch, per loss type, on this process's share."""
    import rewards
    from grpo_img.loss import group_advantages
    from grpo_img.sharding import full_tensor, kept_gathered
    from grpo_img.distributed import check_distributed_type, shard_for_training, sync_gradients
    from grpo_img.trainer import setup_policy, window_backward
    from rewards.base import score_with_isolation

    rank, world = accelerator.process_index, accelerator.num_processes
    config = check_config(world, "unused")
    torch.manual_seed(config.seed)
    policy = setup_policy(config, accelerator.device)
    adapter, heads = policy.trainable_parameters()
    with torch.no_grad():  # move away from the reference policy (LoRA B = 0) so that the KL term has a gradient
        noise = torch.Generator().manual_seed(1)
        for p in adapter + heads:
            p.add_(0.02 * torch.randn(p.shape, generator=noise))
    sharding = check_distributed_type(accelerator)
    shard_for_training(policy, sharding, accelerator)  # under FSDP only
    adapter, heads = policy.trainable_parameters()
    params = adapter + heads
    names = {id(p): n for n, p in policy.model.named_parameters()}

    # the whole batch, sampled identically on every process; each process then keeps its own whole groups
    rollout = policy.sample(PROMPTS, GROUP, cfg_scale=config.cfg_scale, generator=torch.Generator().manual_seed(3))
    results = {}
    if sharding is not None:  # sampling with the layers kept gathered draws the same tokens
        with kept_gathered(policy.model):
            again = policy.sample(PROMPTS, GROUP, cfg_scale=config.cfg_scale,
                                  generator=torch.Generator().manual_seed(3))
        results["gathered_sampling_equal"] = torch.equal(again.completion_ids, rollout.completion_ids)
    values, _ = score_with_isolation(rewards.build_composite(config.rewards), policy.decode(rollout),
                                     rollout.prompts, [{}] * len(rollout))
    values[list(UNSCORED)] = float("nan")
    share = len(rollout) // world
    own = torch.arange(rank * share, (rank + 1) * share)
    rollout, values = rollout.select(own), values[own]
    advantages = group_advantages(values, GROUP, config.scale_rewards)
    # scale_rewards="batch" divides by the std of every process's rewards (NaN ones left out)
    results["batch_advantages"] = group_advantages(
        values, GROUP, "batch", lambda t: accelerator.reduce(t.to(accelerator.device), "sum").cpu())
    mask = rollout.action_mask & ~torch.isnan(values)[:, None]
    with torch.no_grad(), policy.reference():
        ref = policy.token_logprobs(rollout, config.cfg_mode).float()

    base = dict(vars(config))
    for case, overrides in LOSS_CASES.items():
        config.__dict__.update({**base, "loss_type": "grpo", **overrides})
        for p in params:
            p.grad = None
        sums = {k: 0.0 for k in ("kl_sum", "clipped_sum", "tokens", "entropy_sum", "gap_sum", "gap_tokens",
                                 "drift_sum")}
        loss = window_backward(policy, rollout, [torch.arange(share)], mask, advantages, None, ref, config,
                               accelerator, sums)
        loss = accelerator.reduce(loss, "sum") / world
        sync_gradients(params, accelerator)
        # full_tensor: collective, in the same order on every process
        results[case] = {"loss": loss.item(),
                              "grads": {names[id(p)]: full_tensor(p.grad).clone() for p in params}}
    return results


def trained_parameters(output_dir: str, resume: str | None = None,
                       **overrides) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], set[str]]:
    """Every parameter before and after `train()` (full tensors), and the names of those FSDP sharded; the policy
    is caught on its way out of `setup_policy`."""
    import grpo_img.trainer as trainer
    from accelerate import PartialState

    from grpo_img.sharding import full_tensor, is_sharded

    caught = {}
    setup = trainer.setup_policy

    def catching(config, device):
        caught["policy"] = setup(config, device)
        caught["before"] = {n: p.detach().clone() for n, p in caught["policy"].model.named_parameters()}
        return caught["policy"]

    trainer.setup_policy = catching
    try:
        trainer.train(check_config(PartialState().num_processes, output_dir, **overrides), resume=resume)
    finally:
        trainer.setup_policy = setup
    after = caught["policy"].model.named_parameters()
    sharded = {n for n, p in caught["policy"].model.named_parameters() if is_sharded(p)}
    if sharded:  # a sharded forward is a collective: the policy's early-stopping loops must stop together
        assert caught["policy"].lockstep
    return caught["before"], {n: full_tensor(p.detach()).clone() for n, p in after}, sharded


# The training runs (data-parallel and FSDP): dynamic sampling (rounds decided together; the yellow prompt's groups are
# constant, so whichever process draws it samples again and the other must follow), adaptive entropy control (its
# entropy all-reduced), batch-scaled advantages and the GDPO aggregation (all-reduced moments).
COLLECTIVE_TRAINING = {"dynamic_sampling": True, "dynamic_sampling_max_rounds": 2, "use_adaptive_entropy": True,
                "entropy_coef": 0.01, "entropy_target": 100.0, "scale_rewards": "batch",
                "multi_objective_aggregation": "normalize_then_sum",
                "rewards": [{"name": "constant_for_yellow", "weight": 2.0}]}


class ConstantForYellow:
    """The colour reward, except that yellow prompts always score 0.5 (groups without signal)."""

    def __new__(cls, **options):
        from rewards.color import ColorReward

        class Constant(ColorReward):
            def __call__(self, images, prompts, metadata):
                scores = super().__call__(images, prompts, metadata)
                return [0.5 if "yellow" in p else s for p, s in zip(prompts, scores)]

        return Constant(**options)


class FailingOnSecondProcess:
    """A real reward (the colour reward) that is down on process 1 only: it raises there on every call."""

    def __new__(cls, **options):
        from accelerate import PartialState

        from rewards.color import ColorReward

        class Failing(ColorReward):
            def __call__(self, images, prompts, metadata):
                if PartialState().process_index == 1:
                    raise ConnectionError("reward backend down on process 1")
                return super().__call__(images, prompts, metadata)

        return Failing(**options)


def reward_failure_run(out: str) -> None:
    """Train with a reward that fails on process 1 only: every process must stop with the same error."""
    from accelerate import Accelerator

    import grpo_img.trainer as trainer
    import rewards

    rewards.REGISTRY["failing_on_second_process"] = "multiproc_check:FailingOnSecondProcess"
    state = Accelerator().state  # sets up the process group as the trainer's Accelerator will see it
    config = check_config(state.num_processes, str(Path(out) / "run"), max_steps=10, max_reward_failure_steps=2,
                          rewards=[{"name": "failing_on_second_process"}])
    try:
        trainer.train(config)
        outcome = "finished"
    except RuntimeError as error:
        outcome = str(error)
    torch.save({"world": state.num_processes, "outcome": outcome}, Path(out) / f"rank{state.process_index}.pt")


def main(out: str) -> None:
    from accelerate import Accelerator

    from grpo_img.distributed import check_distributed_type

    accelerator = Accelerator()
    fsdp = check_distributed_type(accelerator) is not None
    result = {"world": accelerator.num_processes, "fixed": fixed_batch(accelerator)}
    run = str(Path(out) / "run")
    result["run_dir"] = run
    # under FSDP: a mid-way checkpoint too, a second run that resumes from it, and an evaluation after the last
    # step (every process must take part in it)
    import rewards

    rewards.REGISTRY["constant_for_yellow"] = "multiproc_check:ConstantForYellow"
    # both runs train with the options whose decisions are collective (COLLECTIVE_TRAINING)
    overrides = {**COLLECTIVE_TRAINING, "save_steps": STEPS - 1, "save_total_limit": 0, "eval_steps": STEPS,
                 "eval_prompts": PROMPTS[:1], "eval_num_images": 2, "fsdp_gather_for_sampling": True,
                 "gradient_checkpointing": True} if fsdp else COLLECTIVE_TRAINING
    result["initial"], result["trained"], result["sharded"] = trained_parameters(run, **overrides)
    if fsdp:
        _, result["resumed"], _ = trained_parameters(run, resume=f"{run}/checkpoint-{STEPS - 1}", **overrides)
    torch.save(result, Path(out) / f"rank{accelerator.process_index}.pt")


if __name__ == "__main__":
    if sys.argv[2:] == ["reward_failure"]:
        reward_failure_run(sys.argv[1])
    else:
        main(sys.argv[1])
