"""scikit-learn's 8x8 handwritten digits (1,797 images shipped inside scikit-learn; no download)."""

from __future__ import annotations

import numpy as np
import torch

from vaefast._extras import require
from vaefast.data.base import DataSplit

TEST_FRACTION = 0.2
SPLIT_SEED = 0


def load_digits(split: str = "train") -> DataSplit:
    """scikit-learn's digits with a fixed stratified split (20% test, ``random_state=0``): 1437 train, 360 test.

    Args:
        split: ``"train"`` or ``"test"``.

    Returns:
        A :class:`DataSplit` of float32 pixels / 16 ``[N, 1, 8, 8]`` with int64 labels, in the original order.
    """
    datasets = require("sklearn.datasets", "data", "the digits dataset")
    model_selection = require("sklearn.model_selection", "data", "the digits dataset")
    bunch = datasets.load_digits()
    index = np.arange(len(bunch.target))
    train_idx, test_idx = model_selection.train_test_split(
        index, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=bunch.target
    )
    idx = np.sort(train_idx if split == "train" else test_idx)
    x = torch.from_numpy(bunch.data[idx].astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(bunch.target[idx].astype(np.int64))
    return DataSplit(x.contiguous(), y, None, "digits")
