"""The output folder, the coordinator, results and statistics, comparisons, W&B and progress."""
