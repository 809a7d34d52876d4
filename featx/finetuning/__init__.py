"""Stage 3: fine-tuning named top blocks end to end, from the boundary cache when it can."""

DEFAULT_VIEWS = 2  # --views with augmentation (BENCHMARKS.md, "Stage 3 — the boundary cache": 2, 4, 8 measured);
# here, not in boundary.py, so that auto's cost model reads it without importing torch
