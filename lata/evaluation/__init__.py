"""Evaluation: metrics, the code sandbox, and (later) lm-eval glue. Knows nothing about merging."""
