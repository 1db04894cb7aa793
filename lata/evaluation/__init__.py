"""Evaluation: benchmark tasks, metrics, the code sandbox and the lm-eval harness. Knows nothing about merging."""
