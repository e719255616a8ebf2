"""Text to workflow: the node catalogue, the model's rounds, deterministic repairs."""
