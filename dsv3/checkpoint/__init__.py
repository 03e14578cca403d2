"""Checkpoints: the run's own atomic safetensors store, RNG state, run folders, Hugging Face DeepSeek-V3 import/export."""
