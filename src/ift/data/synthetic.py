"""Synthetic data from a randomly initialised Dai et al. (2019) generative model.

    z ~ N(0, I_latent),   x | z ~ N(mu(z), gamma I),   mu = MLP(z)

with a tanh MLP whose output is a sigmoid (means in (0, 1)) or linear. The generator is kept as
`datamodule.generator` (weights, `gamma`), so the true model is known: learned decoders,
`gamma` and likelihoods can be compared with the truth.

Range: by default x is NOT clipped, so it follows the Gaussian model exactly and can leave
[0, 1] by a few sqrt(gamma). `clip: true` clamps x to [0, 1] (the project's data convention)
at the price of no longer being exactly Gaussian near 0 and 1.

Labels are all zero (`num_classes = 1`): there are no classes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ift.data.base import ImageTensorDataset, LoadedData, SplitDataModule, as_shape


class DaiGenerator(nn.Module):
    """The true generative model: `forward(z)` is the mean mu(z), `sample` draws (x, z).

    Weights are drawn from `seed` with their own `torch.Generator` (not the global RNG):
    W ~ N(0, weight_scale^2 / fan_in), biases ~ N(0, 0.1^2). The parameters are frozen.
    """

    def __init__(
        self,
        latent_dim: int,
        data_dim: int,
        hidden_dims: Sequence[int] = (64,),
        gamma: float = 0.01,
        output: str = "sigmoid",
        weight_scale: float = 2.0,
        seed: int = 0,
    ):
        super().__init__()
        if output not in ("sigmoid", "linear"):
            raise ValueError(f"data.output must be 'sigmoid' or 'linear', got {output!r}")
        if not gamma > 0:
            raise ValueError(f"data.gamma must be > 0 (noise variance), got {gamma!r}")
        if latent_dim <= 0 or data_dim <= 0 or any(int(h) <= 0 for h in hidden_dims):
            raise ValueError(
                f"data.latent_dim and data.hidden_dims must be positive ints, got {latent_dim}, {list(hidden_dims)}"
            )
        self.latent_dim, self.data_dim, self.output = int(latent_dim), int(data_dim), output
        self.register_buffer("gamma", torch.tensor(float(gamma)))

        widths = [self.latent_dim, *(int(h) for h in hidden_dims), self.data_dim]
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(fan_in, fan_out))
            if i < len(widths) - 2:
                layers.append(nn.Tanh())
        if output == "sigmoid":
            layers.append(nn.Sigmoid())
        self.mlp = nn.Sequential(*layers)

        rng = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in self.mlp:
                if isinstance(layer, nn.Linear):
                    layer.weight.normal_(0.0, weight_scale / math.sqrt(layer.in_features), generator=rng)
                    layer.bias.normal_(0.0, 0.1, generator=rng)
        self.requires_grad_(False)

    def forward(self, z: Tensor) -> Tensor:
        """mu(z), shape (N, data_dim)."""
        return self.mlp(z)

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Draw n pairs: z ~ N(0, I), then x = mu(z) + sqrt(gamma) * eps. Returns (x, z)."""
        z = torch.randn(n, self.latent_dim, generator=generator)
        noise = torch.randn(n, self.data_dim, generator=generator)
        return self(z) + self.gamma.sqrt() * noise, z

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor:
        """log p(x, z) = log N(x; mu(z), gamma I) + log N(z; 0, I), per sample, x flattened."""
        x = x.reshape(len(x), -1)
        log_px = -0.5 * (((x - self(z)) ** 2).sum(-1) / self.gamma + self.data_dim * torch.log(2 * math.pi * self.gamma))
        log_pz = -0.5 * ((z**2).sum(-1) + self.latent_dim * math.log(2 * math.pi))
        return log_px + log_pz


class SyntheticDataModule(SplitDataModule):
    """`num_samples` draws from a seeded `DaiGenerator`, split into train/val/test.

    Args:
        shape: image shape (C, H, W) the flat samples are reshaped to; data_dim = C*H*W.
        num_samples: total draws before the split.
        latent_dim, hidden_dims, gamma, output, weight_scale: the true generator (`DaiGenerator`).
        clip: clamp x to [0, 1] (see the module docstring; off by default).
        seed: seeds the generator's weights, the samples and the split.
        Others: see `SplitDataModule`.
    """

    num_classes = 1
    config_name = "synthetic"

    def __init__(
        self,
        shape: Sequence[int] = (1, 8, 8),
        num_samples: int = 2000,
        latent_dim: int = 2,
        hidden_dims: Sequence[int] = (64,),
        gamma: float = 0.01,
        output: str = "sigmoid",
        weight_scale: float = 2.0,
        clip: bool = False,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        num_classes: int | None = None,
    ):
        self.shape = as_shape(shape, "data.shape")
        super().__init__(batch_size, num_workers, seed, val_fraction, test_fraction, shape, num_classes)
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
            raise ValueError(f"data.num_samples must be a positive int, got {num_samples!r}")
        self.num_samples = num_samples
        self.clip = bool(clip)
        # Two decorrelated seeds from one: the generator's weights and the samples.
        weight_seed, self.sample_seed = (
            int(s) for s in torch.randint(2**62, (2,), generator=torch.Generator().manual_seed(seed))
        )
        self.generator = DaiGenerator(
            latent_dim, math.prod(self.shape), hidden_dims, gamma, output, weight_scale, weight_seed
        )
        self.latents: Tensor | None = None  # z of every pool sample, set by setup()

    def load(self) -> LoadedData:
        x, z = self.generator.sample(self.num_samples, torch.Generator().manual_seed(self.sample_seed))
        if self.clip:
            x = x.clamp(0.0, 1.0)
        self.latents = z
        images = x.reshape(self.num_samples, *self.shape).to(torch.float32)
        labels = torch.zeros(self.num_samples, dtype=torch.int64)
        description = f"{self.num_samples} samples of a Dai et al. generator (gamma={float(self.generator.gamma)})"
        return LoadedData(ImageTensorDataset(images, labels), description=description)
