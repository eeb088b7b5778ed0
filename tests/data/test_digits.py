"""Digits: every split sample is the scikit-learn image / 16 with its label."""

import numpy as np
import torch
from sklearn.datasets import load_digits

from ift.data import DigitsDataModule


def test_digits_match_scikit_learn():
    reference = load_digits()
    dm = DigitsDataModule()
    dm.setup()
    assert dm.shape == (1, 8, 8) and dm.num_classes == 10
    for split, dataset in (("train", dm.train_set), ("val", dm.val_set), ("test", dm.test_set)):
        idx = dm.split_indices[split].numpy()
        x = dataset.float_images().numpy()
        np.testing.assert_allclose(x[:, 0], reference.images[idx] / 16.0, rtol=0, atol=1e-7)
        np.testing.assert_array_equal(dataset.labels.numpy(), reference.target[idx])


def test_digits_range():
    dm = DigitsDataModule()
    dm.setup()
    x = torch.cat([dm.train_set.float_images(), dm.val_set.float_images(), dm.test_set.float_images()])
    assert x.dtype == torch.float32 and x.min() == 0.0 and x.max() == 1.0
    # Pixels are k/16 for integers k in 0..16.
    assert torch.equal(x * 16, (x * 16).round())
    labels = torch.cat([dm.train_set.labels, dm.val_set.labels, dm.test_set.labels])
    assert torch.equal(torch.bincount(labels), torch.as_tensor(np.bincount(load_digits().target)))
