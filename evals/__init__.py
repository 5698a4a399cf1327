"""Evaluation: offline task harness (python -m evals) and human side-by-side comparison."""
