"""Training with kprune's update rules: a GradientTape Trainer and a model.fit optimizer wrapper."""

from kprune.train.batchnorm import recalibrate  # noqa: F401
from kprune.train.optimizer import RuleOptimizer, bind  # noqa: F401
from kprune.train.trainer import Trainer  # noqa: F401
