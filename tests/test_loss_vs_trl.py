"""Our policy losses against TRL's own `GRPOTrainer._compute_loss` (TRL is a dependency): a trainer object with
only the attributes `_compute_loss` reads, fed the same log-probs, entropies, advantages and masks; the loss and
the gradients with respect to the log-probs (and the entropies, for the entropy bonus) must agree."""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from trl import GRPOTrainer

from grpo_img.loss import LOSS_TYPES, LossNormalizer, LossSettings, grpo_loss, high_entropy_mask

B, T = 4, 7


def trl_trainer(settings: LossSettings, top_entropy_quantile: float, logps, entropies):
    trainer = object.__new__(GRPOTrainer)
    args = SimpleNamespace(
        use_bias_correction_kl=settings.use_bias_correction_kl, delta=settings.delta,
        sapo_temperature_pos=settings.sapo_temperature_pos, sapo_temperature_neg=settings.sapo_temperature_neg,
        vespo_k_pos=settings.vespo_k_pos, vespo_lambda_pos=settings.vespo_lambda_pos,
        vespo_k_neg=settings.vespo_k_neg, vespo_lambda_neg=settings.vespo_lambda_neg, steps_per_generation=1,
        entropy_target=0.2)
    attributes = dict(
        args=args, accelerator=Accelerator(cpu=True), model=torch.nn.Linear(1, 1), _metrics={"train": defaultdict(list)},
        current_gradient_accumulation_steps=1, max_completion_length=T, use_vllm=False,
        vllm_importance_sampling_correction=False, aux_loss_enabled=False, loss_type=settings.loss_type,
        beta=settings.beta, epsilon_low=settings.epsilon, epsilon_high=settings.epsilon_upper,
        importance_sampling_level=settings.importance_sampling_level,
        off_policy_mask_threshold=settings.off_policy_mask_threshold, top_entropy_quantile=top_entropy_quantile,
        entropy_coef=settings.entropy_coef, use_adaptive_entropy=False,
        _entropy_bonus_enabled=settings.entropy_coef != 0.0)
    trainer.__dict__.update(attributes)
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logps, entropies, None)
    return trainer


def compare(settings: LossSettings, off_policy: bool, top_entropy_quantile: float = 1.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = -torch.rand(B, T, generator=g) * 3
    old = base + (torch.randn(B, T, generator=g) * 0.3 if off_policy else 0.0)
    ref = base + torch.randn(B, T, generator=g) * 0.2
    entropy0 = torch.rand(B, T, generator=g) * 4
    advantages = torch.tensor([1.3, -0.6, 0.0, -1.1])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 1, 0], [1, 1, 0, 0, 0, 0, 0]])

    theirs_logp, theirs_entropy = base.clone().requires_grad_(), entropy0.clone().requires_grad_()
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "ref_per_token_logps": ref, "num_items_in_batch": mask.sum()}
    if off_policy:
        inputs["old_per_token_logps"] = old
    trainer = trl_trainer(settings, top_entropy_quantile, theirs_logp, theirs_entropy)
    theirs = trainer._compute_loss(None, inputs)
    theirs.backward()

    ours_logp, ours_entropy = base.clone().requires_grad_(), entropy0.clone().requires_grad_()
    norm = LossNormalizer(sequences=B, tokens=float(mask.sum()), micro_batches=1, completion_length=T)
    token_mask = high_entropy_mask(ours_entropy, mask.bool(), top_entropy_quantile) \
        if top_entropy_quantile < 1.0 else None
    ours, _ = grpo_loss(ours_logp, old if off_policy else ours_logp.detach(), advantages, mask.bool(),
                        settings=settings, norm=norm, ref_logprobs=ref, entropy=ours_entropy, token_mask=token_mask)
    ours.backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6, abs=1e-7)
    torch.testing.assert_close(ours_logp.grad, theirs_logp.grad, rtol=1e-6, atol=1e-7)
    if settings.entropy_coef:  # the bonus reaches the entropies (of the trained tokens only)
        torch.testing.assert_close(ours_entropy.grad, theirs_entropy.grad, rtol=1e-6, atol=1e-7)
        assert ours_entropy.grad.abs().sum() > 0
        assert (ours_entropy.grad[~mask.bool()] == 0).all()
    return ours_logp.grad


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("off_policy", [False, True])
def test_every_loss_type_equals_trl(loss_type, beta, off_policy):
    grad = compare(LossSettings(loss_type=loss_type, beta=beta, epsilon_high=0.28), off_policy)
    assert grad.abs().sum() > 0


OPTIONS = {
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence"),
    "gspo_luspo": dict(loss_type="luspo", importance_sampling_level="sequence"),
    "gspo_sapo": dict(loss_type="sapo", importance_sampling_level="sequence"),
    "delta": dict(loss_type="dapo", delta=1.1, epsilon_high=0.28),
    "bias_corrected_kl": dict(loss_type="grpo", beta=0.04, use_bias_correction_kl=True),
    "bias_corrected_kl_sequence": dict(loss_type="dr_grpo", beta=0.04, use_bias_correction_kl=True,
                                       importance_sampling_level="sequence"),
    "off_policy_mask": dict(loss_type="dapo", off_policy_mask_threshold=0.05),
    "entropy_bonus": dict(loss_type="grpo", entropy_coef=0.01),
    "entropy_bonus_dapo": dict(loss_type="dapo", entropy_coef=0.01, beta=0.04),
    "cispo_eps5": dict(loss_type="cispo", epsilon_high=5.0),
    "vespo_custom": dict(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_neg=1.0),
    "sapo_temperatures": dict(loss_type="sapo", sapo_temperature_pos=0.5, sapo_temperature_neg=2.0),
}


@pytest.mark.parametrize("name", OPTIONS)
def test_options_equal_trl(name):
    compare(LossSettings(**OPTIONS[name]), off_policy=True)


@pytest.mark.parametrize("quantile", [0.0, 0.2, 0.5])
def test_top_entropy_quantile_equals_trl(quantile):
    compare(LossSettings(loss_type="grpo", entropy_coef=0.01), off_policy=True, top_entropy_quantile=quantile)


def test_the_options_change_the_gradient():
    """Each option is not a no-op on these tensors (so the equalities above compare something)."""
    plain = compare(LossSettings(loss_type="grpo", beta=0.04), off_policy=True)
    for name in ("gspo", "bias_corrected_kl", "off_policy_mask"):
        options = {"loss_type": "grpo", "beta": 0.04, **OPTIONS[name]}
        assert not torch.allclose(compare(LossSettings(**options), off_policy=True), plain), name
    assert not torch.allclose(compare(LossSettings(loss_type="dapo", delta=1.05), off_policy=True),
                              compare(LossSettings(loss_type="dapo"), off_policy=True))


def test_bad_loss_settings_are_clear_errors():
    for options, message in ((dict(loss_type="ppo"), "loss_type must be one of"),
                             (dict(importance_sampling_level="seq"), "importance_sampling_level"),
                             (dict(delta=0.9), "delta must be a number > 1"),
                             (dict(epsilon=0.0), "epsilon must be a number > 0"),
                             (dict(beta=-0.1), "beta must be a number >= 0"),
                             (dict(off_policy_mask_threshold=-1.0), "off_policy_mask_threshold"),
                             (dict(sapo_temperature_neg=0.0), "sapo_temperature_neg")):
        with pytest.raises(ValueError, match=message):
            LossSettings(**options)


def test_config_and_loss_defaults_agree():
    from grpo_img.config import GRPOImgConfig

    assert GRPOImgConfig(prompts=["x"]).loss_settings() == LossSettings()
