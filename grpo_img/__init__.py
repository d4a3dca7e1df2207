"""GRPO for discrete-token text-to-image models: the trainer (`grpo_img.trainer`), its config, evaluation and the
shipped configs (`grpo_img.configs`, the repository's `configs/` folder)."""
