"""Evaluation of frozen representations."""
from lightning_ssl.evaluation.knn import extract_features, few_labels_subset, weighted_knn_predict

__all__ = ["weighted_knn_predict", "extract_features", "few_labels_subset"]
