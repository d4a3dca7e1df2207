"""The shipped run configs (YAML), installed with the package so that `--config NAME` finds them by name."""
