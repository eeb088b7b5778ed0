"""Synthetic Dai et al. data: determinism, and the stored generator reproduces the samples."""

import math

import pytest
import torch
from torch.distributions import MultivariateNormal, Normal

from ift.data import DaiGenerator, SyntheticDataModule


def pool_images(dm):
    """Put the three splits back in pool order."""
    pool = torch.empty(dm.num_samples, *dm.shape)
    for split, dataset in (("train", dm.train_set), ("val", dm.val_set), ("test", dm.test_set)):
        pool[dm.split_indices[split]] = dataset.float_images()
    return pool


def test_same_seed_same_data_other_seed_other_data():
    a, b, c = SyntheticDataModule(seed=5), SyntheticDataModule(seed=5), SyntheticDataModule(seed=6)
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(pool_images(a), pool_images(b))
    for pa, pb in zip(a.generator.parameters(), b.generator.parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(pool_images(a), pool_images(c))
    assert not torch.equal(a.generator.mlp[0].weight, c.generator.mlp[0].weight)


def test_generator_reproduces_the_data():
    dm = SyntheticDataModule(num_samples=500, seed=1)
    dm.setup()
    x, z = dm.generator.sample(500, torch.Generator().manual_seed(dm.sample_seed))
    assert torch.equal(x.reshape(500, 1, 8, 8), pool_images(dm))
    assert torch.equal(z, dm.latents)


def test_noise_is_gaussian_with_variance_gamma():
    dm = SyntheticDataModule(num_samples=2000, gamma=0.04, seed=2)
    dm.setup()
    x = pool_images(dm).reshape(2000, -1)
    residual = (x - dm.generator(dm.latents)) / math.sqrt(0.04)
    n = residual.numel()
    # Standard-normal noise: the sample mean and variance are within ~5 standard errors.
    assert abs(residual.mean().item()) < 5 / math.sqrt(n)
    assert abs(residual.var().item() - 1.0) < 5 * math.sqrt(2 / n)
    # The latents are N(0, I) too.
    assert abs(dm.latents.mean().item()) < 5 / math.sqrt(dm.latents.numel())
    # The generator's mean carries signal well above the noise (otherwise the data is just noise).
    assert dm.generator(dm.latents).var(0).mean() > 0.04


def test_generator_mean_matches_a_hand_written_mlp():
    g = DaiGenerator(latent_dim=3, data_dim=6, hidden_dims=(5, 4), gamma=0.1, output="sigmoid", seed=0)
    z = torch.randn(7, 3)
    (l1, l2, l3) = (m for m in g.mlp if isinstance(m, torch.nn.Linear))
    h = torch.tanh(z @ l1.weight.T + l1.bias)
    h = torch.tanh(h @ l2.weight.T + l2.bias)
    torch.testing.assert_close(g(z), torch.sigmoid(h @ l3.weight.T + l3.bias))
    linear = DaiGenerator(3, 6, (5,), output="linear", seed=0)
    (k1, k2) = (m for m in linear.mlp if isinstance(m, torch.nn.Linear))
    torch.testing.assert_close(linear(z), torch.tanh(z @ k1.weight.T + k1.bias) @ k2.weight.T + k2.bias)
    assert not any(p.requires_grad for p in g.parameters())


def test_log_joint_matches_torch_distributions():
    g = DaiGenerator(latent_dim=2, data_dim=4, hidden_dims=(8,), gamma=0.3, seed=3).double()
    x, z = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    expected = MultivariateNormal(g(z), 0.3 * torch.eye(4, dtype=torch.float64)).log_prob(x)
    expected = expected + Normal(0.0, 1.0).log_prob(z).sum(-1)
    torch.testing.assert_close(g.log_joint(x, z), expected)


def test_shape_labels_and_batches():
    dm = SyntheticDataModule(shape=[1, 4, 4], num_samples=100, batch_size=10)
    dm.setup()
    assert dm.shape == (1, 4, 4) and dm.num_classes == 1 and dm.generator.data_dim == 16
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (10, 1, 4, 4) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and torch.equal(y, torch.zeros(10, dtype=torch.int64))


def test_clip_keeps_data_in_unit_interval():
    unclipped, clipped = SyntheticDataModule(seed=0), SyntheticDataModule(seed=0, clip=True)
    for dm in (unclipped, clipped):
        dm.setup()
    raw, cut = pool_images(unclipped), pool_images(clipped)
    assert raw.min() < 0 or raw.max() > 1  # documented: Gaussian noise leaves [0, 1] unclipped
    assert cut.min() >= 0 and cut.max() <= 1
    torch.testing.assert_close(cut, raw.clamp(0, 1))


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"output": "relu"}, "output"),
        ({"gamma": 0.0}, "gamma"),
        ({"num_samples": 0}, "num_samples"),
        ({"shape": [64]}, "shape"),
        ({"num_classes": 10}, "num_classes"),
        ({"latent_dim": 0}, "latent_dim"),
    ],
)
def test_bad_arguments_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        SyntheticDataModule(**kwargs)
