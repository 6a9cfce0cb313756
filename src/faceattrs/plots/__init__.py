"""Figures, one module per stage (data, train, evaluate, age). Plots read saved results
(arrays, JSON, CSV) and never live inside a training loop. Uses the non-interactive Agg
backend and writes PNGs atomically."""

import matplotlib

matplotlib.use("Agg")
