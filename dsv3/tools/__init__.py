"""Commands around training: the planner, ablations and their report, plots, generation."""
