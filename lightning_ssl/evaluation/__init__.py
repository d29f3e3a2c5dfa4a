"""Evaluation of frozen representations (images: kNN, linear, fine-tuning, ViT fine-tuning with Mixup/CutMix,
segmentation; speech: speaker identification and verification)."""

from lightning_ssl.evaluation.baselines import calibrate_norm_statistics
from lightning_ssl.evaluation.export import (
    POOLS,
    MeanPooledTimmViT,
    MeanPooledViT,
    encoder_pool,
    export_backbone,
    load_encoder,
    load_torchvision_model,
    pooled_encoder,
)
from lightning_ssl.evaluation.finetune import FineTuning, ViTFineTuning, labeled_fraction_subset
from lightning_ssl.evaluation.knn import extract_features, few_labels_subset, knn_accuracy, weighted_knn_predict
from lightning_ssl.evaluation.linear import EncoderChangedError, LinearEvaluation
from lightning_ssl.evaluation.mixup import Mixup
from lightning_ssl.evaluation.segmentation import FCN8s, SegmentationModule, mean_iou
from lightning_ssl.evaluation.speaker import (
    equal_error_rate,
    make_trials,
    min_dcf,
    read_trials,
    speaker_id_accuracy,
    split_per_speaker,
    utterance_embeddings,
    verification_metrics,
)

__all__ = [
    "calibrate_norm_statistics",
    "weighted_knn_predict",
    "extract_features",
    "few_labels_subset",
    "knn_accuracy",
    "LinearEvaluation",
    "EncoderChangedError",
    "FineTuning",
    "ViTFineTuning",
    "Mixup",
    "labeled_fraction_subset",
    "export_backbone",
    "load_encoder",
    "load_torchvision_model",
    "POOLS",
    "pooled_encoder",
    "encoder_pool",
    "MeanPooledViT",
    "MeanPooledTimmViT",
    "FCN8s",
    "SegmentationModule",
    "mean_iou",
    "utterance_embeddings",
    "split_per_speaker",
    "speaker_id_accuracy",
    "make_trials",
    "read_trials",
    "equal_error_rate",
    "min_dcf",
    "verification_metrics",
]
