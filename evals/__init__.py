"""Evaluation harness: lm-evaluation-harness tasks on Kiln runs (python -m evals)."""
