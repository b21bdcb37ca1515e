"""pdt: Predictive Differential Training on saved checkpoints."""

__version__ = "0.1.0"
