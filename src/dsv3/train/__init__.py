"""Pretraining: the `dsv3 pretrain` loop, its schedules, load balancing, checkpoints and plots.

The loop itself is `dsv3.train.pretrain.pretrain(PretrainConfig)`; it is not re-exported here so
that importing the config (e.g. by the CLI parser) does not pull in the model and data code.
"""

from dsv3.train.config import PretrainConfig, PretrainConfigError

__all__ = ["PretrainConfig", "PretrainConfigError"]
