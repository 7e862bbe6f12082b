"""Layer 5, evaluation: the reference model's metrics, eval.py's report, plots, bench, timing."""
