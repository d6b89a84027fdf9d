"""Mean and standard error, the one home of both: over a list of values, and from streamed sums."""
import math
from typing import Dict, Sequence, Tuple, Union

import numpy as np
import torch
from scipy import stats

MIN_VALUES = 2  # a standard error needs two values


def mean_se(values: Union[np.ndarray, torch.Tensor, Sequence[float]]) -> Dict:
    """``{"mean", "se", "num_images"}`` over the defined (non-NaN) values; ``se`` is None below two values."""
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[~np.isnan(values)]
    n = int(len(values))
    mean = float(values.mean()) if n else None
    se = float(stats.sem(values)) if n >= MIN_VALUES else None
    return {'mean': mean, 'se': se, 'num_images': n}


def mean_sd_se_from_sums(sums: torch.Tensor, squares: torch.Tensor, n: int) -> Tuple[list, list, list]:
    """Mean, (unbiased) standard deviation and standard error of ``n`` values known by their sum and sum of
    squares (elementwise over the tensors), for statistics accumulated while streaming."""
    mean = sums / n
    var = (squares / n - mean ** 2).clamp_min(0) * n / max(n - 1, 1)
    sd = var.sqrt()
    return mean.tolist(), sd.tolist(), (sd / math.sqrt(n)).tolist()


def ratio_of_means_se(numerators: torch.Tensor, denominators: torch.Tensor) -> tuple:
    """``mean(x) / mean(a)`` and its standard error over the ``n`` rows (delta method).

    Args:
        numerators: ``[n, ...]``; denominators: ``[n]`` (one per row) or the shape of ``numerators``.

    Returns:
        ``(ratio [...], se [...])``: ``se = sd(x - ratio * a) / (sqrt(n) * mean(a))``.
    """
    n = numerators.shape[0]
    a = denominators.double()
    if a.dim() == 1:
        a = a.reshape(n, *([1] * (numerators.dim() - 1)))
    x = numerators.double()
    ratio = x.mean(0) / a.mean(0)
    residual = x - ratio * a
    return ratio, residual.std(0, unbiased=True) / (n ** 0.5 * a.mean(0))
