"""The harness: CLI, config, the continual loop, end-task fine-tuning, metrics and tables."""
