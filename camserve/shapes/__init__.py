"""The embedded default model: a small CNN trained on generated shapes with known masks."""
