"""Classification metrics with scikit-learn: accuracy, macro F1, per-class scores, confusion matrix."""
from typing import Dict, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support


def classification_metrics(
        labels: Sequence[int],
        predictions: Sequence[int],
        class_names: Sequence[str],
        scalars_only: bool = False,
) -> Dict:
    """Scores predictions against labels.

    Args:
        labels: true class indices ``[M]``.
        predictions: predicted class indices ``[M]``.
        class_names: name of each class index; every class is scored, even one absent from labels.
        scalars_only: return only accuracy and macro F1 (for Trainer's per-epoch evaluation logs).

    Returns:
        ``accuracy``, ``macro_f1`` and, unless scalars_only, ``f1_per_class``,
        ``precision_per_class``, ``recall_per_class``, ``support_per_class`` (class name -> value),
        ``confusion_matrix`` (rows = true, columns = predicted) and ``class_names``.
    """
    labels = np.asarray(labels)
    predictions = np.asarray(predictions)
    indices = list(range(len(class_names)))
    metrics = {
        'accuracy': float(accuracy_score(labels, predictions)),
        'macro_f1': float(f1_score(labels, predictions, labels=indices, average='macro', zero_division=0)),
    }
    if scalars_only:
        return metrics
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=indices, zero_division=0)
    metrics.update({
        'f1_per_class': {n: float(v) for n, v in zip(class_names, f1)},
        'precision_per_class': {n: float(v) for n, v in zip(class_names, precision)},
        'recall_per_class': {n: float(v) for n, v in zip(class_names, recall)},
        'support_per_class': {n: int(v) for n, v in zip(class_names, support)},
        'confusion_matrix': confusion_matrix(labels, predictions, labels=indices).tolist(),
        'class_names': list(class_names),
    })
    return metrics
