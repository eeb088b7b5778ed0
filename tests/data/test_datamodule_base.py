"""The shared split / dataloader logic, exercised through the digits and synthetic modules."""

import pytest
import torch

from ift.data import DigitsDataModule, SyntheticDataModule


def _pool_ids(dm, split):
    return set(dm.split_indices[split].tolist())


def test_splits_are_disjoint_and_cover_the_pool():
    dm = DigitsDataModule(val_fraction=0.1, test_fraction=0.2)
    dm.setup()
    train, val, test = (_pool_ids(dm, s) for s in ("train", "val", "test"))
    assert not (train & val) and not (train & test) and not (val & test)
    assert train | val | test == set(range(1797))
    assert (len(dm.val_set), len(dm.test_set)) == (round(1797 * 0.1), round(1797 * 0.2))
    assert len(dm.train_set) == 1797 - 180 - 359


def test_same_seed_same_split_other_seed_other_split():
    a, b, c = DigitsDataModule(seed=3), DigitsDataModule(seed=3), DigitsDataModule(seed=4)
    for dm in (a, b, c):
        dm.setup()
    for split in ("train", "val", "test"):
        assert torch.equal(a.split_indices[split], b.split_indices[split])
    assert not torch.equal(a.split_indices["val"], c.split_indices["val"])
    assert not torch.equal(a.val_set.float_images(), c.val_set.float_images())


def test_split_ignores_the_global_rng():
    # DDP ranks run with different global RNG states; their splits must still agree.
    torch.manual_seed(0)
    a = DigitsDataModule(seed=1)
    a.setup()
    torch.manual_seed(12345)
    torch.rand(100)
    b = DigitsDataModule(seed=1)
    b.setup()
    assert torch.equal(a.split_indices["train"], b.split_indices["train"])


def test_dataloader_batches():
    dm = DigitsDataModule(batch_size=32)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (32,) and y.dtype == torch.int64
    # val/test loaders are unshuffled: one pass returns the split in order.
    xs = torch.cat([x for x, _ in dm.val_dataloader()])
    assert torch.equal(xs, dm.val_set.float_images())
    assert sum(len(y) for _, y in dm.test_dataloader()) == len(dm.test_set)
    loader = dm.train_dataloader()
    assert loader.num_workers == 0 and not loader.persistent_workers
    assert loader.pin_memory == torch.cuda.is_available()


def test_persistent_workers_only_with_workers():
    dm = DigitsDataModule(num_workers=2)
    dm.setup()
    assert dm.train_dataloader().persistent_workers


def test_dataloader_before_setup_is_an_error():
    with pytest.raises(RuntimeError, match="setup"):
        DigitsDataModule().train_dataloader()


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "val_fraction \\+ data.test_fraction"),
        ({"shape": [1, 28, 28]}, "data.shape"),
        ({"shape": [8, 8]}, "data.shape"),
        ({"num_classes": 9}, "data.num_classes"),
    ],
)
def test_bad_arguments_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        DigitsDataModule(**kwargs)


def test_declared_shape_and_classes_accepted_when_right():
    dm = DigitsDataModule(shape=(1, 8, 8), num_classes=10)
    assert dm.shape == (1, 8, 8) and dm.num_classes == 10


def test_too_few_samples_for_the_fractions_is_an_error():
    dm = SyntheticDataModule(num_samples=5, val_fraction=0.05, test_fraction=0.05)
    with pytest.raises(ValueError, match="empty split"):
        dm.setup()
