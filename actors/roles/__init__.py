"""The role classes: Generator (samples any model of the job), RewardScorer, Trainer. Plain
classes; runtime/cluster.py is the one place they become Ray actors."""
