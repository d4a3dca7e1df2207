"""Networks the families need that transformers and diffusers do not ship, with the release checkpoints' names."""
