"""`tide demo`: the main job on the embedded default (CPU, SmolLM2-135M, private Redis)."""
