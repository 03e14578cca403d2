"""dsv3: DeepSeek-V3-style MoE model and training, pure PyTorch."""
