"""Distributed training: expert-parallel dispatch and data parallelism, applied from outside the model."""
