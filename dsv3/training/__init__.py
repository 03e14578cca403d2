"""Training interfaces shared by the one-process and parallel trainers: optimizer, LR schedule, precision policy, faults, stops, logging, balance metrics."""
