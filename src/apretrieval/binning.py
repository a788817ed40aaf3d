"""The histogram bins of AP_Q: the default count, the fewest each estimator works with, and
the one check of a bin count (plain Python: a recipe is checked before torch is loaded).

The paper uses 20 bins over cosine similarities; fewer bins blur the ranking, many more make
the soft assignment close to a step function (vanishing gradients between bin centres).
"""

from __future__ import annotations

import numbers
from typing import Any

__all__ = ["DEFAULT_NUM_BINS", "MIN_BINS", "SHARP_MIN_BINS", "check_num_bins"]

DEFAULT_NUM_BINS = 20  # the paper's setting
MIN_BINS = 2  # the triangular kernel needs two bin centres
# The sharp estimator: K = M - 3 >= 1 bin between the top score and the lowest positive.
SHARP_MIN_BINS = 4


def check_num_bins(num_bins: Any, estimator: str = "plain") -> int:
    """``num_bins`` as an int; ValueError unless it is an integer the ``estimator`` (``plain``,
    ``tie_aware`` or ``sharp``) can work with."""
    fewest = SHARP_MIN_BINS if estimator == "sharp" else MIN_BINS
    if (
        isinstance(num_bins, bool)
        or not isinstance(num_bins, numbers.Integral)
        or num_bins < MIN_BINS
    ):
        raise ValueError(f"num_bins must be an integer >= {MIN_BINS}, got {num_bins!r}")
    if num_bins < fewest:
        raise ValueError(
            f"num_bins must be >= {fewest} for estimator='{estimator}', got {num_bins}"
        )
    return int(num_bins)
