"""End-to-end GRPO runs of the tiny demo: it learns, it resumes exactly, it writes what it promises, and it stops
cleanly on bad numbers."""

import json
import math
import shutil

import pytest
import torch
from peft import PeftModel
from PIL import Image

import policies
from grpo_img.config import load_config
from grpo_img.reporting import read_metrics
from grpo_img.trainer import train
from rewards.base import Reward


DEMO_TEST_STEPS = 100  # of the demo's 160: still shows the rise (about 0.36 -> 0.85), in about 25 s


def demo_config(tmp_path, **overrides):
    values = {"output_dir": str(tmp_path / "run"), "report_to": "none", "image_log_steps": "0"}
    values.update({k: str(v) for k, v in overrides.items()})
    return load_config(None, values)


def test_run_writes_metrics_images_curve_and_a_loadable_adapter(tmp_path):
    config = demo_config(tmp_path, max_steps=4, image_log_steps=2, save_steps=2, report_to="tensorboard")
    out = train(config)
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for key in ("step", "reward_mean", "reward_std", "kl", "loss", "entropy", "clip_ratio", "step_seconds"):
        assert all(isinstance(m[key], (int, float)) and math.isfinite(m[key]) for m in metrics), key
    assert metrics[0]["kl"] == 0.0  # a fresh adapter is the reference policy
    assert metrics[0]["logprob_gap"] < 1e-4  # mixture scoring reproduces the sampled log-probs
    assert (out / "reward_curve.png").stat().st_size > 1000
    assert sorted(p.name for p in (out / "images").iterdir()) == ["step_000001", "step_000002", "step_000004"]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    groups = config.prompts_per_step
    assert [s["step"] for s in samples] == [1] * groups + [2] * groups + [4] * groups
    for record in samples:  # one strip per group: G cells of 128 px, the rewards of the group
        assert len(record["rewards"]) == config.num_generations and record["plans"] is None
        assert Image.open(out / record["image"]).width == 128 * config.num_generations
    assert (out / "report" / "index.html").is_file()  # written at the end of the run
    assert (out / "checkpoint-2" / "trainer_state.pt").is_file() and (out / "checkpoint-4").is_dir()
    # the adapter loads with plain peft on top of the base model and changes it
    base = policies.build("janus", tiny=True, tiny_palette=["red", "green", "blue"], seed=0)
    rollout = base.sample(["a red image"], 2, cfg_scale=5.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = base.token_logprobs(rollout)
        PeftModel.from_pretrained(base.model, str(out / "adapter"))
        after = base.token_logprobs(rollout)
    assert not torch.allclose(before, after)


def test_resume_continues_with_exactly_the_same_metrics(tmp_path):
    # adaptive entropy control keeps its coefficient in the run state: a resume that lost it would differ
    adaptive = dict(use_adaptive_entropy="true", entropy_coef=0.01, entropy_target=100.0)
    full = demo_config(tmp_path, max_steps=6, save_steps=3, save_total_limit=0, num_iterations=2,
                       lr_scheduler_type="cosine", warmup_steps=2, **adaptive)
    uninterrupted = read_metrics(train(full))
    # a second run that starts from the step-3 checkpoint of the first, in a fresh directory
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "run" / "checkpoint-3", resumed_dir / "checkpoint-3")
    (resumed_dir / "metrics.jsonl").write_text(
        "".join(json.dumps(m) + "\n" for m in uninterrupted[:3]) + json.dumps({"step": 4, "stale": True}) + "\n")
    config = demo_config(tmp_path, max_steps=6, save_steps=3, save_total_limit=0, num_iterations=2,
                         lr_scheduler_type="cosine", warmup_steps=2, output_dir=str(resumed_dir), **adaptive)
    resumed = read_metrics(train(config, resume=True))
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]
    # two updates per step, each raising the coefficient by entropy_coef_delta (entropy is below the target)
    assert [round(m["entropy_coef"], 6) for m in uninterrupted] == [round(0.01 + 0.01 * s, 6) for s in range(1, 7)]
    for a, b in zip(uninterrupted[3:], resumed[3:]):  # everything but the timings (*_seconds)
        assert {k: v for k, v in a.items() if not k.endswith("_seconds")} == \
            {k: v for k, v in b.items() if not k.endswith("_seconds")}


def test_several_updates_per_rollout_and_other_loss_types_run(tmp_path):
    config = demo_config(tmp_path, max_steps=2, save_steps=0, num_iterations=2, steps_per_generation=2,
                         per_device_train_batch_size=8, gradient_accumulation_steps=1, loss_type="dapo",
                         epsilon_high=0.28, scale_rewards="batch", cfg_mode="conditional")
    metrics = read_metrics(train(config))
    assert all(math.isfinite(m["loss"]) for m in metrics)
    assert metrics[0]["logprob_gap"] > 1e-3  # conditional scoring is off-policy under CFG, and says so
    assert metrics[-1]["clip_ratio"] >= 0.0


def test_logprob_gap_is_the_first_scoring_and_drift_is_logged_apart(tmp_path):
    """With several passes per rollout the gap is measured before any update (mixture mode: ~0 at every step); what
    the updates move is `policy_drift`."""
    config = demo_config(tmp_path, max_steps=2, save_steps=0, num_iterations=2, steps_per_generation=2,
                         per_device_train_batch_size=8, gradient_accumulation_steps=1)
    metrics = read_metrics(train(config))
    assert all(m["logprob_gap"] < 1e-4 for m in metrics)
    assert all(m["policy_drift"] > 1e-3 for m in metrics)


@pytest.mark.parametrize("options", [
    dict(loss_type="sapo", importance_sampling_level="sequence", num_iterations=2),
    dict(loss_type="cispo", epsilon_high=5.0, top_entropy_quantile=0.2, entropy_coef=0.01, adam_epsilon=1e-6),
    dict(loss_type="vespo", beta=0.04, use_bias_correction_kl="true", off_policy_mask_threshold=0.5,
         num_iterations=2),
    dict(loss_type="luspo", importance_sampling_level="sequence", delta=1.5),
    dict(multi_objective_aggregation="normalize_then_sum", scale_rewards="batch",
         rewards=json.dumps([{"name": "color"}, {"name": "color", "weight": 0.5, "colors": ["red", "green"]}])),
], ids=["gspo_sapo", "cispo_top_entropy", "vespo_bias_kl_opsm", "luspo_delta", "normalize_then_sum"])
def test_trl_loss_variants_train(tmp_path, options):
    metrics = read_metrics(train(demo_config(tmp_path, max_steps=2, save_steps=0, **options)))
    assert all(math.isfinite(m["loss"]) and m["skipped_updates"] == 0 for m in metrics)
    if "top_entropy_quantile" in options:  # about the top 20% of the tokens by entropy train
        assert all(0.1 < m["trained_token_fraction"] < 0.35 for m in metrics)


def test_adam_epsilon_reaches_the_optimizer(tmp_path):
    from grpo_img.trainer import build_optimizer, setup_policy

    config = demo_config(tmp_path, adam_epsilon=1e-6, policy_options=json.dumps({"tiny": True}))
    optimizer, _ = build_optimizer(setup_policy(config, torch.device("cpu")), config)
    assert [group["eps"] for group in optimizer.param_groups] == [1e-6] * len(optimizer.param_groups)
    with pytest.raises(ValueError, match="adam_epsilon: must be > 0"):
        demo_config(tmp_path, adam_epsilon=0)


def test_lora_dropout_is_refused_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match="lora_dropout must be 0.*on-policy"):
        demo_config(tmp_path, lora_dropout=0.05)


def test_gradient_checkpointing_changes_nothing_but_memory(tmp_path):
    plain = read_metrics(train(demo_config(tmp_path, max_steps=2, save_steps=0)))
    checkpointed = read_metrics(train(demo_config(tmp_path, max_steps=2, save_steps=0, gradient_checkpointing=True,
                                                  output_dir=str(tmp_path / "gc"))))
    for a, b in zip(plain, checkpointed):
        for key in ("reward_mean", "loss", "kl", "entropy", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key


class Infinite(Reward):
    def __call__(self, images, prompts, metadata):
        return [math.inf if "red" in p else 0.5 for p in prompts]


class Failing(Reward):
    def __call__(self, images, prompts, metadata):
        if len(images) > 1:
            raise RuntimeError("batch too big")
        if "red" in prompts[0]:
            raise RuntimeError("cannot score red")
        return [0.5]


class HugeAfterThreeSteps(Reward):
    """Ordinary rewards for three steps, then finite rewards on an absurd scale: with scale_rewards=none the loss
    overflows to inf."""

    calls = 0

    def __call__(self, images, prompts, metadata):
        type(self).calls += 1
        if type(self).calls <= 3:
            return [0.1 * (i % 3) for i in range(len(images))]
        return [3e38 if i % 2 else -3e38 for i in range(len(images))]


def test_nonfinite_loss_skips_steps_then_stops(tmp_path, monkeypatch, caplog):
    import rewards

    monkeypatch.setitem(rewards.REGISTRY, "huge_later", f"{__name__}:HugeAfterThreeSteps")
    monkeypatch.setattr(HugeAfterThreeSteps, "calls", 0)
    config = demo_config(tmp_path, max_steps=10, save_steps=1, save_total_limit=5, scale_rewards="none",
                         rewards='[{"name": "huge_later"}]', max_nonfinite_steps=3)
    with pytest.raises(RuntimeError, match="non-finite loss in 3 steps in a row"):
        train(config)
    assert "skipped because the loss or gradient was not finite" in caplog.text
    # no checkpoint was written over the skipped steps; the good ones stay
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2",
                                                                                "checkpoint-3"]


def test_infinite_rewards_are_unscored_not_trained_on(tmp_path, monkeypatch, caplog):
    import rewards

    monkeypatch.setitem(rewards.REGISTRY, "infinite", f"{__name__}:Infinite")
    config = demo_config(tmp_path, max_steps=2, save_steps=0, rewards='[{"name": "infinite"}]')
    metrics = read_metrics(train(config))
    assert all(m["reward_failures"] == 8 and m["reward_mean"] == 0.5 and math.isfinite(m["loss"])
               for m in metrics)
    assert "infinite value" in caplog.text


def test_failing_reward_samples_are_isolated(tmp_path, monkeypatch, caplog):
    import rewards

    monkeypatch.setitem(rewards.REGISTRY, "failing", f"{__name__}:Failing")
    config = demo_config(tmp_path, max_steps=2, save_steps=0, rewards='[{"name": "failing"}]')
    metrics = read_metrics(train(config))
    assert all(m["reward_failures"] == 8 for m in metrics)  # the red group, 8 samples, each step
    assert all(m["reward_failures/failing"] == 8 for m in metrics)  # counted per part of the composite
    assert all(m["reward_mean"] == 0.5 for m in metrics)
    assert "cannot score red" in caplog.text


def test_unreachable_reward_server_stops_the_run_after_max_reward_failure_steps(tmp_path, caplog):
    import socket

    with socket.socket() as s:  # a free port: nothing listens there
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    config = demo_config(tmp_path, max_steps=5, save_steps=0, max_reward_failure_steps=2,
                         policy_options='{"tiny": true}',  # no palette fitting: nothing is learned here
                         rewards=json.dumps([{"name": "remote", "url": url, "retries": 1, "backoff": 0.01}]))
    with pytest.raises(RuntimeError, match="could not score any sample for 2 steps in a row"):
        train(config)
    assert "did not answer after 2 attempt(s)" in caplog.text


def test_step_logs_restart_with_the_run(tmp_path):
    """A resumed run cuts metrics.jsonl and samples.jsonl after the checkpoint's step; a fresh run empties them."""
    from grpo_img.reporting import MetricsLog

    for name in ("metrics.jsonl", "samples.jsonl"):
        (tmp_path / name).write_text("".join(json.dumps({"step": s, "row": 0}) + "\n" for s in (1, 2, 3, 4)))
    MetricsLog(tmp_path, resume_step=2)
    for name in ("metrics.jsonl", "samples.jsonl"):
        assert [json.loads(line)["step"] for line in (tmp_path / name).read_text().splitlines()] == [1, 2]
    MetricsLog(tmp_path, resume_step=None)
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "samples.jsonl").exists()


def test_a_torn_last_log_line_is_dropped_on_resume_and_a_corrupt_one_is_an_error(tmp_path, caplog):
    """Power loss or a full disk mid-write leaves half a line at the end of metrics.jsonl: resume drops it."""
    from grpo_img.reporting import MetricsLog, read_metrics

    lines = [json.dumps({"step": s, "reward_mean": 0.5}) for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n" + lines[0][:9])
    with caplog.at_level("WARNING"):
        assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3]
        MetricsLog(tmp_path, resume_step=2)
    assert "torn last line" in caplog.text
    assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(lines[:2]) + "\n"
    (tmp_path / "metrics.jsonl").write_text(lines[0] + "\n{not json\n" + lines[2] + "\n")
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        MetricsLog(tmp_path, resume_step=2)


class ConstantForSomePrompts:
    """The colour reward, except that prompts saying "constant" always score 0.5: their groups carry no signal."""

    def __new__(cls, **options):
        from rewards.color import ColorReward

        class Reward(ColorReward):
            def __call__(self, images, prompts, metadata):
                colour = super().__call__(images, ["a red image" if "constant" in p else p for p in prompts],
                                          metadata)
                return [0.5 if "constant" in p else c for p, c in zip(prompts, colour)]

        return Reward(**options)


def dynamic_config(tmp_path, monkeypatch, **overrides):
    import rewards

    monkeypatch.setitem(rewards.REGISTRY, "constant_for_some", "test_training:ConstantForSomePrompts")
    prompts = json.dumps(["a red image", "constant one", "a green image", "constant two", "constant three",
                          "a blue image"])
    return demo_config(tmp_path, rewards=json.dumps([{"name": "constant_for_some"}]), prompts=prompts,
                       per_device_train_batch_size=16, num_generations=8, dynamic_sampling="true",
                       dynamic_sampling_max_rounds=4, save_steps=2, save_total_limit=0, **overrides)


def test_dynamic_sampling_keeps_only_informative_groups(tmp_path, monkeypatch):
    metrics = read_metrics(train(dynamic_config(tmp_path, monkeypatch, max_steps=4)))
    assert sum(m["dynamic_sampling_rounds"] for m in metrics) > 0  # constant groups were drawn and replaced
    assert any(m["dynamic_sampling_drop_rate"] > 0 for m in metrics)
    for m in metrics:
        if m["dynamic_sampling_filled_groups"] == 0:  # the groups that reached the loss all carry a signal
            assert len(m["reward_per_prompt"]) >= 1
            assert not any("constant" in p for p in m["reward_per_prompt"]), m["reward_per_prompt"]
            assert m["zero_std_groups"] == 0.0
    # without it the constant groups are trained on (zero advantage)
    plain = read_metrics(train(demo_config(tmp_path, rewards=json.dumps([{"name": "constant_for_some"}]),
                                           prompts=json.dumps(["constant one", "a red image"]), max_steps=1,
                                           per_device_train_batch_size=16, num_generations=8,
                                           output_dir=str(tmp_path / "plain"))))
    assert plain[0]["zero_std_groups"] == 0.5 and "dynamic_sampling_rounds" not in plain[0]


def test_dynamic_sampling_resumes_exactly(tmp_path, monkeypatch):
    full = read_metrics(train(dynamic_config(tmp_path, monkeypatch, max_steps=4)))
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "run" / "checkpoint-2", resumed_dir / "checkpoint-2")
    resumed = read_metrics(train(dynamic_config(tmp_path, monkeypatch, max_steps=4, output_dir=str(resumed_dir)),
                                 resume=True))
    assert [m["step"] for m in resumed] == [3, 4]
    for a, b in zip(full[2:], resumed):
        assert {k: v for k, v in a.items() if not k.endswith("_seconds")} == \
            {k: v for k, v in b.items() if not k.endswith("_seconds")}


class ScoresOnlyTheFirstBatch:
    """The colour reward for its first call; then every sample is unscored (an outage)."""

    def __new__(cls, **options):
        from rewards.color import ColorReward

        class Reward(ColorReward):
            calls = 0

            def __call__(self, images, prompts, metadata):
                type(self).calls += 1
                if type(self).calls > 1:
                    raise ConnectionError("reward backend down")
                return super().__call__(images, prompts, metadata)

        return Reward(**options)


def test_unscored_steps_do_not_move_the_adapter(tmp_path, monkeypatch):
    """With zero gradients Adam's momentum would still move the adapter: an unscored window skips the update."""
    import rewards
    from peft.utils import load_peft_weights

    monkeypatch.setitem(rewards.REGISTRY, "first_batch_only", "test_training:ScoresOnlyTheFirstBatch")
    config = demo_config(tmp_path, rewards=json.dumps([{"name": "first_batch_only"}]), max_steps=3, save_steps=1,
                         save_total_limit=0, max_reward_failure_steps=5)
    out = train(config)
    metrics = read_metrics(out)
    assert [m["unscored_updates_skipped"] for m in metrics] == [0, 1, 1]
    after_first = load_peft_weights(str(out / "checkpoint-1" / "adapter"))
    final = load_peft_weights(str(out / "adapter"))
    assert any(v.abs().sum() > 0 for k, v in after_first.items() if "lora_B" in k)  # step 1 trained
    assert all(torch.equal(after_first[k], final[k]) for k in final)
    assert metrics[1]["learning_rate"] == metrics[0]["learning_rate"]


def fast_config(tmp_path, **overrides):
    """The demo without its palette fit (seconds faster), for tests about the run folder."""
    return demo_config(tmp_path, policy_options=json.dumps({"tiny": True}), **overrides)


def test_a_fresh_run_refuses_a_used_output_dir_unless_told_to_clear_it(tmp_path):
    train(fast_config(tmp_path, max_steps=2, save_steps=1))
    with pytest.raises(ValueError, match="is not empty .*--resume.*--overwrite_output_dir"):
        train(fast_config(tmp_path, max_steps=2, save_steps=1, learning_rate=0.01))
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    train(fast_config(tmp_path, max_steps=1, save_steps=0, overwrite_output_dir="true"))
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1]
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-1"]


def test_resume_refuses_trajectory_changes_and_records_the_allowed_ones(tmp_path):
    train(fast_config(tmp_path, max_steps=2, save_steps=1, save_total_limit=0))
    for changed, named in ((dict(learning_rate=2e-3), "learning_rate"), (dict(lr_scheduler_type="cosine"),
                                                                         "lr_scheduler_type")):
        with pytest.raises(ValueError, match=f"change the training trajectory: {named}"):
            train(fast_config(tmp_path, max_steps=4, save_steps=1, save_total_limit=0, **changed), resume=True)
    with pytest.raises(ValueError, match="max_steps 2 is not above the checkpoint's step 2"):
        train(fast_config(tmp_path, max_steps=2, save_steps=1, save_total_limit=0), resume=True)
    train(fast_config(tmp_path, max_steps=3, save_steps=1, save_total_limit=0, image_log_steps=1), resume=True)
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3]
    record = json.loads((tmp_path / "run" / "resumes.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 2 and record["changed"] == {"max_steps": {"from": 2, "to": 3},
                                                         "image_log_steps": {"from": 0, "to": 1}}
    assert json.loads((tmp_path / "run" / "config.json").read_text())["max_steps"] == 3


def test_resume_falls_back_from_a_corrupted_checkpoint(tmp_path, caplog):
    train(fast_config(tmp_path, max_steps=2, save_steps=1, save_total_limit=0))
    state = tmp_path / "run" / "checkpoint-2" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:-100])  # a disk error in the newest checkpoint
    with caplog.at_level("WARNING"):
        train(fast_config(tmp_path, max_steps=3, save_steps=0, save_total_limit=0), resume=True)
    assert "skipping" in caplog.text and "checkpoint-2" in caplog.text and "bytes" in caplog.text
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3]  # resumed at step 1, ran 2 and 3
    with pytest.raises(ValueError, match="cannot be used: trainer_state.pt has"):
        train(fast_config(tmp_path, max_steps=4), resume=str(tmp_path / "run" / "checkpoint-2"))


class ThreadRecordingReward(Reward):
    """The color reward, noting which thread scored each call (the overlap must move scoring off the sampler's)."""

    def __init__(self):
        import rewards

        self.inner, self.threads = rewards.build_composite([{"name": "color"}]), []

    def __call__(self, images, prompts, metadata=None):
        import threading

        self.threads.append(threading.current_thread().name)
        return self.inner(images, prompts, metadata)


@pytest.mark.parametrize("policy_name", ["janus", "blip3o_next"])
def test_rollout_chunks_overlap_decode_and_reward_with_sampling_and_keep_the_batch(tmp_path, policy_name):
    """rollout_chunks=3: parts of whole groups, each rewarded in a background thread, the scored batch equal to
    sampling the parts one after the other on the same generator and scoring each (BLIP3o-NEXT, whose decode runs
    the language model, decodes on the sampling thread and is rewarded in the background)."""
    from accelerate import Accelerator

    from grpo_img.data import PromptRecord
    from grpo_img.trainer import sample_and_score, setup_policy
    from policies.base import concat_rollouts

    config = demo_config(tmp_path, policy=policy_name, num_generations=2, per_device_train_batch_size=10,
                         rollout_chunks=3)
    accelerator = Accelerator(cpu=True)
    policy = setup_policy(config, accelerator.device, policies.build(policy_name, tiny=True))
    records = [PromptRecord(p, {"color": c}) for p, c in
               [("a red image", "red"), ("a green image", "green"), ("a blue image", "blue"),
                ("a red image", "red"), ("a green image", "green")]]
    reward = ThreadRecordingReward()
    seconds = {"sample": 0.0, "decode": 0.0, "reward": 0.0}
    scored = sample_and_score(policy, reward, records, config, accelerator, torch.Generator().manual_seed(3),
                              seconds)
    assert len(reward.threads) == 3 and all(name.startswith("decode-and-reward") for name in reward.threads)
    assert all(seconds[k] > 0 for k in seconds)

    generator, parts = torch.Generator().manual_seed(3), [records[:2], records[2:4], records[4:]]
    knobs = dict(cfg_scale=config.cfg_scale, temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                 min_p=config.min_p)
    rollouts = [policy.sample([r.prompt for r in part], 2, generator=generator, **knobs) for part in parts]
    expected = concat_rollouts(rollouts)
    assert torch.equal(scored.rollout.completion_ids, expected.completion_ids)
    assert torch.equal(scored.rollout.group_index, torch.arange(5).repeat_interleave(2))
    assert scored.rollout.prompts == expected.prompts and [r.prompt for r in scored.records] == \
        [r.prompt for r in records]
    images = [image for r in rollouts for image in policy.decode(r)]
    assert [image.size for image in scored.images] == [image.size for image in images]
    want = reward.inner(images, expected.prompts, [r.metadata for r in records for _ in range(2)])
    torch.testing.assert_close(scored.rewards, torch.as_tensor(want, dtype=scored.rewards.dtype))


def test_rollout_chunks_must_fit_the_prompts_of_a_step(tmp_path):
    with pytest.raises(ValueError, match="rollout_chunks: must be >= 1"):
        demo_config(tmp_path, rollout_chunks=0)
    with pytest.raises(ValueError, match="more than the"):
        demo_config(tmp_path, num_generations=4, per_device_train_batch_size=8, rollout_chunks=3)


def test_a_run_with_rollout_chunks_trains(tmp_path):
    out = train(demo_config(tmp_path, max_steps=2, rollout_chunks=2))
    assert [m["step"] for m in read_metrics(out)] == [1, 2]
