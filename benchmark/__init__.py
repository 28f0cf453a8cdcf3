"""The harness: CLI, config, the continual loop, end-task fine-tuning, metrics and tables."""

# first, before anything imports transformers: a CUDA-only torchvision beside a CPU torch
from benchmark import compat  # noqa: E402, F401
