"""Evaluation of frozen representations."""

from lightning_ssl.evaluation.baselines import calibrate_norm_statistics
from lightning_ssl.evaluation.export import export_backbone, load_encoder, load_torchvision_model
from lightning_ssl.evaluation.finetune import FineTuning, labeled_fraction_subset
from lightning_ssl.evaluation.knn import extract_features, few_labels_subset, knn_accuracy, weighted_knn_predict
from lightning_ssl.evaluation.linear import EncoderChangedError, LinearEvaluation
from lightning_ssl.evaluation.segmentation import FCN8s, SegmentationModule, mean_iou

__all__ = [
    "calibrate_norm_statistics",
    "weighted_knn_predict",
    "extract_features",
    "few_labels_subset",
    "knn_accuracy",
    "LinearEvaluation",
    "EncoderChangedError",
    "FineTuning",
    "labeled_fraction_subset",
    "export_backbone",
    "load_encoder",
    "load_torchvision_model",
    "FCN8s",
    "SegmentationModule",
    "mean_iou",
]
