"""Run configuration: one flat dataclass, YAML file plus `--key value` overrides, unknown keys rejected.

Names follow TRL's `GRPOConfig` / `TrainingArguments` where the concept is the same (num_generations, beta,
epsilon, epsilon_high, loss_type, scale_rewards, num_iterations, steps_per_generation, temperature, top_k, top_p,
max_grad_norm, learning_rate, per_device_train_batch_size, gradient_accumulation_steps, max_steps, save_steps, ...).
One difference, stated: a *step* here is one rollout batch and the updates made from it. With the defaults
(steps_per_generation = gradient_accumulation_steps, num_iterations = 1) that is exactly one optimizer update, as
in TRL.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.resources
import json
import logging
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

import policies
import rewards
from grpo_img.loss import MULTI_OBJECTIVE_AGGREGATIONS, SCALE_REWARDS, LossSettings
from grpo_img.tracking import report_to_names
from policies.base import SamplingSettings
from policies.plan import PlanSettings

log = logging.getLogger(__name__)

DEMO_CONFIG = "demo_tiny"


def shipped_configs_dir() -> Path:
    """The shipped configs: the repository's configs/ (a checkout, an editable install) or the installed
    grpo_img.configs package (a wheel)."""
    checkout = Path(__file__).resolve().parent.parent / "configs"
    if (checkout / f"{DEMO_CONFIG}.yaml").is_file():
        return checkout
    return Path(str(importlib.resources.files("grpo_img.configs")))


def resolve_config_path(path: str | Path) -> Path:
    """A config file path, or the name of a shipped config (`janus_pro_7b`, `janus_pro_7b.yaml`)."""
    path = Path(path)
    if path.is_file():
        return path
    if path.parent == Path("."):
        shipped = shipped_configs_dir() / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
        if shipped.is_file():
            return shipped
    names = sorted(p.stem for p in shipped_configs_dir().glob("*.yaml"))
    raise FileNotFoundError(f"config file not found: {path} (shipped configs, by name: {', '.join(names)})")


@dataclass
class GRPOImgConfig:
    # -- what to train on -------------------------------------------------------------------------------------
    policy: str = "janus"
    policy_options: dict = field(default_factory=dict)  # passed to policies.build(policy, **policy_options)
    rewards: list = field(default_factory=lambda: [{"name": "color"}])  # [{name, weight, **options}]
    prompts: typing.Any = None  # a list, a .txt / .jsonl path, or "hf:NAME[:SPLIT]" for a datasets dataset
    prompt_column: str = "prompt"

    # -- sampling (identical in rollout and scoring) -------------------------------------------------------------
    # cfg_scale / temperature / top_k / top_p / min_p: None takes the policy family's release setting (its
    # `default_sampling`: Janus-Pro CFG 5, Emu3 3, Chameleon/Anole 3, BLIP3o-NEXT 1 = none, SEED-X none); the run's
    # saved config.json holds the resolved values.
    num_generations: int = 8  # G, samples per prompt
    cfg_scale: float | None = None
    cfg_mode: str = "mixture"  # "mixture": score the guided distribution sampled from; "conditional": cond only
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None  # 0 (off) unless set

    # -- think-then-draw (policies/plan.py): a text plan first, then the image conditioned on prompt + plan --------
    plan: bool = False
    plan_max_tokens: int = 64
    plan_temperature: float = 1.0  # the plan is text: sampled without CFG, with its own settings
    plan_top_k: int = 0
    plan_top_p: float = 1.0
    plan_end_marker: str | None = None  # a token of the policy's tokenizer; None: its EOS
    plan_instruction: str = "{prompt}"  # the plan-writing request, inside the family's prompt template
    train_plan: bool = True  # plan tokens in the action mask
    train_image_tokens: bool = True  # free image tokens in the action mask (with a plan)

    # -- batch geometry (per process, in samples) ----------------------------------------------------------------
    per_device_train_batch_size: int = 8  # samples per forward/backward
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer update
    steps_per_generation: int | None = None  # micro-batches per rollout batch (default: gradient_accumulation_steps)
    num_iterations: int = 1  # passes over each rollout batch
    # the rollout batch is sampled in this many parts (whole prompt groups); each part is decoded and rewarded in a
    # background thread while the next part samples (1: sample, then decode, then reward, one after the other).
    # Each part runs every decode step at 1/N of the rows: it pays only where a step is compute-bound (docs/training.md)
    rollout_chunks: int = 1

    # -- GRPO loss (TRL GRPOConfig names and meanings; grpo_img/loss.py and docs/training.md list them) ---------
    loss_type: str = "dapo"  # grpo | dr_grpo | dapo | bnpo | cispo | sapo | luspo | vespo
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None  # two-sided clipping (INTELLECT-2), > 1
    importance_sampling_level: str = "token"  # "sequence": GSPO
    use_bias_correction_kl: bool = False  # TRL's default is True; False keeps the plain k3 KL
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    off_policy_mask_threshold: float | None = None  # DeepSeek-V3.2 off-policy sequence masking
    top_entropy_quantile: float = 1.0  # train only the top quantile of tokens by entropy (1: all)
    entropy_coef: float = 0.0  # entropy bonus (mean entropy of the trained tokens)
    use_adaptive_entropy: bool = False  # Skywork-OR1: move entropy_coef towards entropy_target each update
    entropy_coef_min: float = 0.0
    entropy_coef_max: float = 1.0
    entropy_coef_delta: float = 0.005
    entropy_target: float = 0.2
    scale_rewards: str = "group"
    # DAPO's dynamic sampling (ReasonGen-R1's filter_groups): groups whose rewards do not differ are replaced by
    # groups of further prompts, at most dynamic_sampling_max_rounds extra rounds per step
    dynamic_sampling: bool = False
    dynamic_sampling_max_rounds: int = 3
    multi_objective_aggregation: str = "sum_then_normalize"  # or "normalize_then_sum" (GDPO), several rewards

    # -- optimisation --------------------------------------------------------------------------------------------
    learning_rate: float = 1e-5
    image_heads_learning_rate: float | None = None  # for modules_to_save (image heads); None: learning_rate
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8  # LoRA gradients on image tokens can be ~5e-9, where 1e-8 dominates Adam's update
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = "constant"  # any transformers scheduler name
    warmup_steps: int = 0
    max_steps: int = 100
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0  # must stay 0: dropout would make the on-policy ratio differ from 1
    train_image_heads: bool = True  # image heads as peft modules_to_save, where the family has them
    gradient_checkpointing: bool = False
    fsdp_gather_for_sampling: bool = False  # under FSDP: keep the layers gathered while sampling (grpo_img/sharding.py)
    bf16: bool | None = None  # None: bf16 autocast on GPU, fp32 on CPU
    seed: int = 42

    # -- output --------------------------------------------------------------------------------------------------
    output_dir: str = "runs/demo"
    overwrite_output_dir: bool = False  # a fresh run in a non-empty output_dir clears it (else it is refused)
    logging_steps: int = 1
    image_log_steps: int = 10  # sample images (one per prompt group) every N steps and at step 1 (0: never)
    save_steps: int = 50  # checkpoint every N steps (0: only at the end)
    save_total_limit: int = 2
    # trackers (grpo_img/tracking.py), TRL's names: tensorboard, wandb, trackio, mlflow, comet_ml, aim, all, none
    report_to: typing.Any = "tensorboard"
    tracker_project_name: str = "grpo-img"  # the W&B / trackio / MLflow project (TensorBoard: tensorboard/NAME)
    max_nonfinite_steps: int = 3  # stop after this many non-finite losses in a row
    max_reward_failure_steps: int = 3  # stop after this many steps in a row where no sample could be scored

    # -- evaluation during training (grpo_img/evaluate.py), logged as eval/* next to the training metrics --------
    eval_prompts: typing.Any = None  # held-out prompts, in any form `prompts` accepts
    eval_steps: int = 0  # evaluate every N steps and after the last (0: never)
    eval_rewards: list | None = None  # [{name, **options}] as metrics; None: the training rewards
    eval_num_images: int = 4  # images per eval prompt

    def __post_init__(self) -> None:
        _coerce_numbers(self)
        if self.steps_per_generation is None:
            self.steps_per_generation = self.gradient_accumulation_steps

    # -- derived -------------------------------------------------------------------------------------------------
    @property
    def generation_batch_size(self) -> int:
        """Samples per rollout batch, per process."""
        return self.per_device_train_batch_size * self.steps_per_generation

    @property
    def prompts_per_step(self) -> int:
        return self.generation_batch_size // self.num_generations

    def validate(self) -> None:
        """Every field's type (strictly: `true` is no number, `maybe` no boolean) and range, then how they fit
        together; one line per problem, before anything is built."""
        problems = _type_problems(self) + _range_problems(self)
        if problems:
            raise ValueError("invalid config:\n  " + "\n  ".join(problems))
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (GRPO compares samples within a group), "
                             f"got {self.num_generations}")
        if self.generation_batch_size % self.num_generations:
            raise ValueError(
                f"per_device_train_batch_size x steps_per_generation = {self.generation_batch_size} must be a "
                f"multiple of num_generations = {self.num_generations} (whole groups per process)")
        if self.rollout_chunks > self.prompts_per_step:
            raise ValueError(f"rollout_chunks = {self.rollout_chunks} is more than the {self.prompts_per_step} prompts "
                             "a process samples per step (a part holds whole prompt groups)")
        if self.steps_per_generation % self.gradient_accumulation_steps:
            raise ValueError("steps_per_generation must be a multiple of gradient_accumulation_steps")
        self.loss_settings()  # validates the loss fields
        if self.loss_type == "luspo" and self.importance_sampling_level != "sequence":
            log.warning("loss_type luspo is defined with importance_sampling_level: sequence (the paper's setup)")
        if self.loss_type == "vespo" and self.importance_sampling_level != "token":
            log.warning("loss_type vespo computes its sequence weight itself; importance_sampling_level should be token")
        if self.dynamic_sampling_max_rounds < 1:
            raise ValueError(f"dynamic_sampling_max_rounds must be >= 1, got {self.dynamic_sampling_max_rounds}")
        if not 0.0 <= self.top_entropy_quantile <= 1.0:
            raise ValueError(f"top_entropy_quantile must be in [0, 1], got {self.top_entropy_quantile}")
        if not self.adam_epsilon > 0:
            raise ValueError(f"adam_epsilon must be > 0, got {self.adam_epsilon}")
        if self.use_adaptive_entropy and not (0 <= self.entropy_coef_min <= self.entropy_coef_max
                                              and self.entropy_coef_delta > 0):
            raise ValueError("adaptive entropy needs 0 <= entropy_coef_min <= entropy_coef_max and "
                             "entropy_coef_delta > 0")
        if self.multi_objective_aggregation not in MULTI_OBJECTIVE_AGGREGATIONS:
            raise ValueError(f"multi_objective_aggregation must be one of {MULTI_OBJECTIVE_AGGREGATIONS}, got "
                             f"{self.multi_objective_aggregation!r}")
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {self.scale_rewards!r}")
        if self.cfg_mode not in ("mixture", "conditional"):
            raise ValueError(f"cfg_mode must be 'mixture' or 'conditional', got {self.cfg_mode!r}")
        if self.lora_dropout != 0:
            raise ValueError(f"lora_dropout must be 0, got {self.lora_dropout}: GRPO's ratio compares the scored "
                             "distribution with the sampled one, and dropout in the training forward would make "
                             "them differ on-policy, so grpo-img trains with dropout off everywhere")
        for name in ("max_steps", "num_iterations", "per_device_train_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        policies.policy_class(self.policy)  # a registered name, or "module:Class" that imports
        for key in ("rewards", "eval_rewards"):
            for entry in getattr(self, key) or []:
                if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                    raise ValueError(f"{key} entry {entry!r} needs a 'name' among {', '.join(rewards.available())}, "
                                     "or your own reward as 'module:Name'")
                rewards.reward_factory(entry["name"])
        report_to_names(self.report_to)  # known names (installed ones: checked when the run starts)
        if self.eval_steps < 0:
            raise ValueError(f"eval_steps must be >= 0, got {self.eval_steps}")
        if self.eval_steps and self.eval_prompts is None:
            raise ValueError("eval_steps is set but eval_prompts is not: give held-out prompts to evaluate on")
        if self.eval_num_images < 1:
            raise ValueError(f"eval_num_images must be >= 1, got {self.eval_num_images}")
        if self.prompts is None:
            raise ValueError("no prompts: set `prompts` to a list, a .txt/.jsonl file or 'hf:DATASET'")
        if not self.rewards:
            raise ValueError("no rewards configured")
        if not self.plan and not self.train_image_tokens:
            raise ValueError("train_image_tokens: false leaves nothing to train without a plan (set plan: true)")
        if self.plan:
            self.plan_settings()  # validates the plan fields
        SamplingSettings().override(self.cfg_scale, self.temperature, self.top_k, self.top_p,
                                    self.min_p)  # validates the ranges

    def loss_settings(self) -> LossSettings:
        """The loss fields (the same names in both) as `grpo_img.loss.LossSettings`, which checks their ranges."""
        return LossSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LossSettings)})

    def plan_settings(self):
        """The think-then-draw settings, or None when it is off."""
        if not self.plan:
            return None
        return PlanSettings(max_tokens=self.plan_max_tokens, temperature=self.plan_temperature, top_k=self.plan_top_k,
                            top_p=self.plan_top_p, end_marker=self.plan_end_marker,
                            instruction=self.plan_instruction, train_plan=self.train_plan,
                            train_image=self.train_image_tokens)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_sampling(self, settings) -> "GRPOImgConfig":
        """This config with the sampling fields set to `settings` (a resolved `policies.SamplingSettings`)."""
        return dataclasses.replace(self, cfg_scale=settings.cfg_scale, temperature=settings.temperature,
                                   top_k=settings.top_k, top_p=settings.top_p, min_p=settings.min_p)


FIELDS = {f.name: f for f in dataclasses.fields(GRPOImgConfig)}

# Ranges, checked before anything is built. (name, test, what it must be)
POSITIVE = ("learning_rate", "image_heads_learning_rate", "max_grad_norm", "adam_epsilon", "plan_temperature",
            "temperature", "entropy_coef_delta")
AT_LEAST_ONE = ("max_steps", "num_iterations", "per_device_train_batch_size", "gradient_accumulation_steps",
                "steps_per_generation", "lora_r", "lora_alpha", "logging_steps", "max_nonfinite_steps",
                "max_reward_failure_steps", "plan_max_tokens", "eval_num_images", "num_generations", "rollout_chunks")
NON_NEGATIVE = ("beta", "weight_decay", "warmup_steps", "save_steps", "save_total_limit", "image_log_steps",
                "eval_steps", "top_k", "plan_top_k", "entropy_coef_min", "entropy_target")
UNIT_INTERVAL = ("adam_beta1", "adam_beta2")  # [0, 1)


def config_help() -> str:
    """Every config key with its default and the comment beside it in `GRPOImgConfig`, by section (for --help)."""
    import inspect
    import re

    lines = []
    for line in inspect.getsource(GRPOImgConfig).splitlines():
        section = re.match(r"\s+# -- (.+?) -+$", line)
        entry = re.match(r"\s+(\w+): [^=]+= (.+?)(?:\s+#\s*(.*))?$", line)
        if section:
            lines.append(f"\n{section.group(1)}:")
        elif entry and entry.group(1) in FIELDS:
            name, _, comment = entry.groups()
            f = FIELDS[name]
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            lines.append(f"  --{name} (default {json.dumps(default)})" + (f": {comment}" if comment else ""))
    return "config keys (YAML or --key value; TRL's names where the concept is the same):" + "\n".join(lines)


def _type_problems(config: GRPOImgConfig) -> list[str]:
    """Each field against its annotation, strictly (pydantic): a bool is not a number, a string not a bool."""
    from pydantic import ValidationError

    hints = typing.get_type_hints(GRPOImgConfig)
    problems = []
    for name, hint in hints.items():
        value = getattr(config, name)
        try:
            setattr(config, name, _type_adapter(hint).validate_python(value, strict=True))
        except ValidationError as error:
            expected = getattr(hint, "__name__", str(hint)).replace("NoneType", "null")
            problems.append(f"{name}: {error.errors()[0]['msg'].lower()} ({expected}), got {value!r}")
    return problems


@functools.cache
def _type_adapter(hint):
    from pydantic import TypeAdapter

    return TypeAdapter(hint)


def _range_problems(config: GRPOImgConfig) -> list[str]:
    problems = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{f.name}: must be a finite number, got {value}")
    for name in POSITIVE:
        value = getattr(config, name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not value > 0:
            problems.append(f"{name}: must be > 0, got {value}")
    for name in AT_LEAST_ONE:
        value = getattr(config, name)
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            problems.append(f"{name}: must be >= 1, got {value}")
    for name in NON_NEGATIVE:
        value = getattr(config, name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            problems.append(f"{name}: must be >= 0, got {value}")
    for name in UNIT_INTERVAL:
        value = getattr(config, name)
        if isinstance(value, (int, float)) and not 0 <= value < 1:
            problems.append(f"{name}: must be in [0, 1), got {value}")
    for key in ("rewards", "eval_rewards"):
        for entry in getattr(config, key) or []:
            weight = entry.get("weight", 1.0) if isinstance(entry, dict) else 1.0
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                problems.append(f"{key}: the weight of {entry.get('name')!r} must be a finite number, got {weight!r}")
    return problems


def _coerce_numbers(config: GRPOImgConfig) -> None:
    """YAML reads `1e-5` (no dot) as a string; turn such strings into the field's number type, or fail clearly."""
    for f in dataclasses.fields(config):
        value, kind = getattr(config, f.name), str(f.type)
        if not isinstance(value, str) or not any(t in kind for t in ("float", "int")):
            continue
        try:
            setattr(config, f.name, float(value) if "float" in kind else int(value))
        except ValueError:
            raise ValueError(f"config key {f.name!r} must be a number, got {value!r}") from None


# keys of earlier versions, and what replaced them
RENAMED = {"report_to_tensorboard": "report_to (tensorboard, wandb, trackio, mlflow, comet_ml, aim, all or none)"}


def _check_keys(keys, where: str) -> None:
    for key in keys:
        if key in RENAMED:
            raise ValueError(f"config key {key!r} in {where} is now {RENAMED[key]}")
        if key not in FIELDS:
            close = difflib.get_close_matches(key, FIELDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown config key {key!r} in {where}{hint}")


def _parse_value(key: str, text: str):
    """A command-line value as YAML (numbers, booleans, lists, null), kept a string for str fields."""
    if FIELDS[key].type in ("str", str):
        return text
    return yaml.safe_load(text)


def load_config(path: str | Path | None = None, overrides: dict[str, str] | None = None) -> GRPOImgConfig:
    """The demo config when `path` is None; `overrides` are raw command-line strings keyed by field name."""
    path = resolve_config_path(path if path is not None else DEMO_CONFIG)
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of config keys")
    _check_keys(values, str(path))
    overrides = overrides or {}
    _check_keys(overrides, "command-line overrides")
    values.update({k: _parse_value(k, v) for k, v in overrides.items()})
    config = GRPOImgConfig(**values)
    config.validate()
    return config


def save_config(config: GRPOImgConfig, path: str | Path) -> None:
    Path(path).write_text(json.dumps(config.to_dict(), indent=2, default=str))
