"""Export a trained run as a plain model: `python -m grpo_img.export --config CFG --adapter RUN/adapter --out DIR`.

The LoRA adapter, and the image heads trained in full next to it (peft `modules_to_save`), are merged into the
base weights (peft's `merge_and_unload`), and the policy's own `save_pretrained` writes the family's loadable
layout: transformers `save_pretrained` folders with their processor/tokenizer for Janus-Pro, Emu3 and
Chameleon/Anole, the release layouts for BLIP3o-NEXT and SEED-X. The folder loads with no adapter and no
grpo-img-specific file, through the same loading code as the base (`policies.build(NAME, model_name_or_path=DIR)`,
or the family's own `from_pretrained` for the transformers families), and a model card (README.md) says what it is.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
from pathlib import Path

import policies
from grpo_img.config import GRPOImgConfig, load_config
from grpo_img.evaluate import attach_adapter
from grpo_img.reporting import read_metrics
from policies.base import Policy

log = logging.getLogger(__name__)

# Options that say where the base weights come from (or how random ones are made): the export replaces them by
# its own folder. Every other option (dtype, decode batch size, prompt format, ...) applies to it as to the base.
WEIGHT_SOURCE_OPTIONS = {"model_name_or_path", "tiny", "tiny_palette", "tiny_palette_steps", "seed", "tokenizer_path",
                         "detokenizer_path", "sdxl_path", "negative_embeds_path", "vqgan_path",
                         "diffusion_name_or_path"}
EXPORT_FILE = "grpo_img_export.json"


def merge_adapter(policy: Policy, adapter: str | Path) -> Policy:
    """`policy` with the adapter at `adapter` merged into its weights (in place); no peft wrapper is left."""
    peft_model = attach_adapter(policy, adapter)
    # merge_and_unload swaps the LoRA layers and the modules_to_save wrappers for plain modules inside the model,
    # in place, so the family's code (which reaches its submodules through the model) uses the merged weights
    policy.model = peft_model.merge_and_unload()
    policy.peft_model = None
    policy.freeze()
    return policy


def export_merged(config: GRPOImgConfig, adapter: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Build the config's base policy, merge the adapter, save the family's layout and a model card into `out`."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"--out {out} is not empty: choose another folder, or pass --overwrite")
        log.warning("--overwrite: replacing the contents of %s", out)
        shutil.rmtree(out)
    policy = merge_adapter(policies.build(config.policy, **config.policy_options), adapter)
    policy.save_pretrained(str(out))
    load_options = {k: v for k, v in config.policy_options.items() if k not in WEIGHT_SOURCE_OPTIONS}
    (out / EXPORT_FILE).write_text(json.dumps({"policy": config.policy, "load_options": load_options,
                                               "base": base_description(config), "adapter": str(adapter)}, indent=2))
    (out / "README.md").write_text(model_card(config, Path(adapter), out, load_options))
    return out


def load_exported(path: str | Path, **options) -> Policy:
    """An exported folder as a policy, with the options it was exported with (`options` override them)."""
    saved = json.loads((Path(path) / EXPORT_FILE).read_text())
    return policies.build(saved["policy"], model_name_or_path=str(path), **{**saved["load_options"], **options})


def base_description(config: GRPOImgConfig) -> str:
    options = config.policy_options
    if options.get("tiny"):
        return f"{config.policy} tiny (random weights, seed {options.get('seed', 0)})"
    return str(options.get("model_name_or_path"))


def run_summary(adapter: Path) -> tuple[int | None, dict]:
    """(steps trained, the last evaluation's figures) from the run folder the adapter came from, where there is
    one: RUN/adapter, or RUN/checkpoint-N/adapter."""
    folder = adapter.resolve().parent
    checkpoint_step = None
    if folder.name.startswith("checkpoint-"):
        checkpoint_step, folder = int(folder.name.split("-")[1]), folder.parent
    if not (folder / "metrics.jsonl").is_file():
        return checkpoint_step, {}
    metrics = [m for m in read_metrics(folder) if checkpoint_step is None or m["step"] <= checkpoint_step]
    steps = checkpoint_step if checkpoint_step is not None else (metrics[-1]["step"] if metrics else None)
    evaluated = [m for m in metrics if any(k.startswith("eval/") for k in m)]
    figures = {k: v for k, v in evaluated[-1].items() if k.startswith("eval/")} if evaluated else {}
    if evaluated:
        figures["step"] = evaluated[-1]["step"]
    return steps, figures


def model_card(config: GRPOImgConfig, adapter: Path, out: Path, load_options: dict) -> str:
    steps, figures = run_summary(adapter)
    rewards = "\n".join(f"- `{r['name']}` (weight {r.get('weight', 1.0)})"
                        + (f", options {json.dumps({k: v for k, v in r.items() if k not in ('name', 'weight')})}"
                           if len(r) > 2 or (len(r) == 2 and "weight" not in r) else "")
                        for r in config.rewards)
    if figures:
        rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in figures.items()
                         if k != "step" and isinstance(v, (int, float)) and math.isfinite(v))
        evaluation = f"Last evaluation (step {figures['step']}):\n\n| metric | value |\n|---|---|\n{rows}\n"
    else:
        evaluation = "The run did not evaluate (eval_steps: 0).\n"
    options = f", **{json.dumps(load_options)}" if load_options else ""
    heads = config.train_image_heads and policies.policy_class(config.policy).modules_to_save
    merged = f"the LoRA adapter (r {config.lora_r}, alpha {config.lora_alpha})" + \
        (" and the image heads trained in full" if heads else "")
    trained = f"{steps if steps is not None else 'unknown (the adapter is not inside a run folder)'}, " \
        f"{config.num_generations} samples per prompt, learning rate {config.learning_rate}, beta {config.beta}, " \
        f"loss `{config.loss_type}`"
    return f"""# {config.policy} fine-tuned with GRPO (grpo-img)

- **Base model:** {base_description(config)}
- **Family:** `{config.policy}`; {merged} merged into the weights
- **Steps:** {trained}
- **Sampling in training:** cfg_scale {config.cfg_scale}, temperature {config.temperature}, top_k {config.top_k}, top_p {config.top_p}

## Rewards

{rewards}

## Evaluation

{evaluation}
## Loading

The folder is in the family's own layout and needs no adapter:

```python
import policies
policy = policies.build("{config.policy}", model_name_or_path="{out}"{options})
```
"""


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the run's config (YAML, a shipped name, or RUN/config.json)")
    parser.add_argument("--adapter", required=True, help="the LoRA adapter folder, e.g. RUN/adapter")
    parser.add_argument("--out", required=True, help="the folder to write (must be empty or new)")
    parser.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --out")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)  # YAML, a shipped name, or a run's config.json (JSON is YAML)
        out = export_merged(config, args.adapter, args.out, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    print(f"exported: {out} (model card: {out / 'README.md'})")


if __name__ == "__main__":
    main()
