"""Stage 3: fine-tuning named top blocks end to end, from the boundary cache when it can."""
