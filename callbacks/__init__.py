"""Callbacks: EMA targets, MoCo's queue, kNN monitoring, online linear probe, online speaker verification,
divergence guard, preemption, the progress bar, pictures for the dashboards, the run summary.

Installed as ``lightning_ssl.callbacks`` (the repository keeps the folder at its top level).
"""

from lightning_ssl.callbacks.divergence_guard import DivergenceError, DivergenceGuard
from lightning_ssl.callbacks.ema_update import EMAUpdate
from lightning_ssl.callbacks.embedding_writer import EmbeddingWriter
from lightning_ssl.callbacks.knn_monitor import KNNMonitor
from lightning_ssl.callbacks.online_probe import OnlineLinearProbe
from lightning_ssl.callbacks.preemption import Preempted, PreemptionCheckpoint
from lightning_ssl.callbacks.progress import SSLProgressBar
from lightning_ssl.callbacks.queue_update import QueueUpdate
from lightning_ssl.callbacks.run_summary import RunSummary
from lightning_ssl.callbacks.speaker_verification import SpeakerVerificationMonitor
from lightning_ssl.callbacks.view_grid import ViewGridLogger

__all__ = [
    "EMAUpdate",
    "QueueUpdate",
    "KNNMonitor",
    "OnlineLinearProbe",
    "SpeakerVerificationMonitor",
    "DivergenceGuard",
    "DivergenceError",
    "PreemptionCheckpoint",
    "Preempted",
    "EmbeddingWriter",
    "SSLProgressBar",
    "RunSummary",
    "ViewGridLogger",
]
