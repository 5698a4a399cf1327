"""Human evaluation: a blind side-by-side comparison of two runs in a web page.

  python -m evals.human --a=DIR1 --b=DIR2 --prompts=FILE --output=DIR [--port=8765]
  python -m evals.human --summary=DIR

Each prompt is completed by both runs (completions.py), annotators judge the pairs in a
browser with sides shuffled per annotator and item (store.py, app.py), and the summary
gives A's win rate, the agreement between annotators and the position bias (stats.py).
Everything lives in the output folder, so a restart keeps the completions and the
judgements, and `preferences.jsonl` feeds the DPO and reward-model tasks directly.
"""
