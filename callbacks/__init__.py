"""Callbacks: momentum-encoder EMA, MoCo queue maintenance, kNN monitoring."""
from callbacks.knn_monitor import KNNMonitor
from callbacks.momentum_update import MomentumUpdate
from callbacks.queue_update import QueueUpdate

__all__ = ["MomentumUpdate", "QueueUpdate", "KNNMonitor"]
