"""Tensor and expert parallelism over torch.distributed: parallel layers, sharded loading, a multi-process engine."""

from dsv3.parallel.dist import ParallelConfig, ParallelError

__all__ = ["ParallelConfig", "ParallelError"]
