"""The benchmark of the progress relay (bench/run.py); see docs/PERFORMANCE.md."""
