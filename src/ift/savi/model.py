"""The Dai et al. (2019) Gaussian VAE: the math, with no Lightning.

Generative model: z ~ N(0, I_d), x | z ~ N(mu_x(z), gamma I_D), mu_x an MLP.
Variational family: q(z | x) = N(mu, diag(sigma^2)) with local parameters
lambda = (mu, log_sigma), shape (B, 2d). An encoder proposes lambda_0 = enc(x).

All ELBO functions take the reparameterisation noise `eps` explicitly (shape (S, B, d)), so a
fixed `eps` makes the ELBO a deterministic, smooth function of lambda and of the decoder: what the
inner optimisation and the IFT need.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.func import functional_call

LOG_2PI = math.log(2 * math.pi)


def mlp(sizes: Sequence[int], activation: type[nn.Module] = nn.Softplus) -> nn.Sequential:
    """Linear layers of the given sizes with `activation` between them (none after the last).

    Softplus by default: the inner problem and the IFT need a smooth decoder (a ReLU decoder has a
    piecewise-constant Hessian, which makes Hessian-vector products uninformative).
    """
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def split_lambda(lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 2d) -> mu (B, d), log_sigma (B, d)."""
    mu, log_sigma = lam.chunk(2, dim=-1)
    return mu, log_sigma


def gaussian_kl(lam: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) per example, in closed form. Shape (B,)."""
    mu, log_sigma = split_lambda(lam)
    return 0.5 * (mu.pow(2) + torch.exp(2 * log_sigma) - 1 - 2 * log_sigma).sum(-1)


def gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_gamma: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, gamma I) summed over the data dimensions. x: (B, D), mean: (..., B, D)."""
    dim = x.shape[-1]
    sq = (x - mean).pow(2).sum(-1)
    return -0.5 * (dim * (LOG_2PI + log_gamma) + sq * torch.exp(-log_gamma))


# Activations the latent-space Hessian treats as elementwise (their derivatives by forward-mode AD).
ELEMENTWISE = (nn.Softplus, nn.Sigmoid, nn.Tanh, nn.ELU, nn.SiLU, nn.GELU, nn.ReLU, nn.LeakyReLU)


def _elementwise_derivatives(act: nn.Module, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """act(a), act'(a), act''(a) of an elementwise activation (nested jvp with unit tangents)."""
    ones = torch.ones_like(a)
    (out, first), (_, second) = torch.func.jvp(lambda u: torch.func.jvp(act, (u,), (ones,)), (a,), (ones,))
    return out, first, second


class GaussianVAE(nn.Module):
    """Encoder, decoder and the (fixed or learned) observation variance gamma."""

    def __init__(
        self,
        data_dim: int,
        latent_dim: int = 8,
        hidden: Sequence[int] = (128, 128),
        gamma_init: float = 1.0,
        learn_gamma: bool = True,
        gamma_min: float = 1e-4,
        sigmoid_output: bool = True,
    ) -> None:
        super().__init__()
        if data_dim < 1 or latent_dim < 1:
            raise ValueError(f"data_dim and latent_dim must be >= 1, got {data_dim}, {latent_dim}")
        if gamma_init <= 0 or gamma_min <= 0:
            raise ValueError(f"model.gamma.init and model.gamma.min must be > 0, got {gamma_init}, {gamma_min}")
        self.data_dim, self.latent_dim = data_dim, latent_dim
        self.sigmoid_output = sigmoid_output
        self.gamma_min = gamma_min
        self.encoder = mlp([data_dim, *hidden, 2 * latent_dim])
        self.decoder = mlp([latent_dim, *reversed(list(hidden)), data_dim])
        log_gamma = torch.tensor(math.log(gamma_init))
        if learn_gamma:
            self.log_gamma = nn.Parameter(log_gamma)
        else:
            self.register_buffer("log_gamma", log_gamma)

    # --- parameters of the generative model (what the inner problem depends on) ---------------
    def generative_params(self) -> dict[str, torch.Tensor]:
        """Decoder weights and log_gamma by name: the `theta` of the inner problem."""
        params = {f"decoder.{k}": v for k, v in self.decoder.named_parameters()}
        params["log_gamma"] = self.log_gamma
        return params

    def clamped_log_gamma(self, log_gamma: torch.Tensor | None = None) -> torch.Tensor:
        log_gamma = self.log_gamma if log_gamma is None else log_gamma
        return log_gamma.clamp_min(math.log(self.gamma_min))

    @property
    def gamma(self) -> torch.Tensor:
        return self.clamped_log_gamma().exp()

    # --- model pieces --------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """lambda_0 = (mu, log_sigma) = enc(x), shape (B, 2d)."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """mu_x(z); with `params` (from `generative_params`), a functional call on those tensors."""
        if params is None:
            out = self.decoder(z)
        else:
            dec = {k.removeprefix("decoder."): v for k, v in params.items() if k.startswith("decoder.")}
            out = functional_call(self.decoder, dec, (z,))
        return torch.sigmoid(out) if self.sigmoid_output else out

    def sample_eps(self, batch: int, n_samples: int = 1, generator: torch.Generator | None = None,
                   like: torch.Tensor | None = None) -> torch.Tensor:
        ref = like if like is not None else self.log_gamma
        return torch.randn(n_samples, batch, self.latent_dim, generator=generator,
                           device=ref.device, dtype=ref.dtype)

    def elbo_terms(self, x: torch.Tensor, lam: torch.Tensor, eps: torch.Tensor,
                   params: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example (E_q log p(x|z), KL(q||p)), the expectation a mean over the S noise draws."""
        mu, log_sigma = split_lambda(lam)
        z = mu + torch.exp(log_sigma) * eps  # (S, B, d)
        log_gamma = self.clamped_log_gamma(None if params is None else params["log_gamma"])
        recon = gaussian_log_likelihood(x, self.decode(z, params), log_gamma).mean(0)
        return recon, gaussian_kl(lam)

    def elbo(self, x: torch.Tensor, lam: torch.Tensor, eps: torch.Tensor,
             params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Per-example ELBO(lambda; x, theta) with fixed noise `eps`. Shape (B,)."""
        recon, kl = self.elbo_terms(x, lam, eps, params)
        return recon - kl

    def neg_elbo_hessian(self, x: torch.Tensor, lam: torch.Tensor, eps: torch.Tensor,
                         params: dict[str, torch.Tensor] | None = None, exact: bool = True,
                         create_graph: bool = False) -> torch.Tensor:
        """Hessian of -ELBO(lambda) per example, (B, 2d, 2d), built in latent space.

        With z_s = mu + sigma * eps_s and l(z) = ||x - mu_x(z)||^2 / (2 gamma), the Hessian in
        lambda = (mu, log_sigma) follows from the d x d Hessians H_s of l at the S*B points z_s by
        the chain rule (D_s = diag(sigma * eps_s)):
            H_mu,mu = mean_s H_s,  H_mu,ls = mean_s H_s D_s,
            H_ls,ls = mean_s D_s H_s D_s + diag(mean_s grad l(z_s) * sigma * eps_s),
        plus the closed-form KL Hessian (I for mu, diag(2 sigma^2) for log_sigma). H_s comes from one
        pass through the decoder that carries its Jacobian (`reconstruction_derivatives`).
        `exact=False` uses the Gauss-Newton H_s = J_s^T J_s / gamma (PSD, but it drops the
        residual-weighted decoder curvature and converges only linearly). `create_graph=True` keeps
        the result differentiable in lam and the params (unrolled Newton); else no graph is built.
        """
        mu, log_sigma = split_lambda(lam)
        n_samples, batch, d = eps.shape
        with torch.set_grad_enabled(create_graph and torch.is_grad_enabled()):
            sigma_eps = torch.exp(log_sigma) * eps                        # (S, B, d)
            z = (mu + sigma_eps).reshape(-1, d)
            xs = x.repeat(n_samples, 1)
            log_gamma = self.clamped_log_gamma(None if params is None else params["log_gamma"])
            if exact:
                grad_z, h_z = self.reconstruction_derivatives(z, xs, log_gamma, params)
            else:
                eye = torch.eye(d, dtype=lam.dtype, device=lam.device).unsqueeze(1).expand(d, z.shape[0], d)
                mean, jac = torch.func.vmap(
                    lambda v: torch.func.jvp(lambda zz: self.decode(zz, params), (z,), (v,)),
                    out_dims=(None, 0))(eye)                           # mean (SB, D), jac (d, SB, D)
                h_z = torch.einsum("inx,jnx->nij", jac, jac) * torch.exp(-log_gamma)
                grad_z = -torch.einsum("inx,nx->ni", jac, xs - mean) * torch.exp(-log_gamma)
            h_z = 0.5 * (h_z + h_z.transpose(-1, -2))
            h_z = h_z.reshape(n_samples, batch, d, d)
            grad_z = grad_z.reshape(n_samples, batch, d)
            h_mm = h_z.mean(0) + torch.eye(d, dtype=lam.dtype, device=lam.device)  # + KL: mu^2 / 2
            h_ms = (h_z * sigma_eps.unsqueeze(-2)).mean(0)
            h_ss = (sigma_eps.unsqueeze(-1) * h_z * sigma_eps.unsqueeze(-2)).mean(0)
            h_ss = h_ss + torch.diag_embed((grad_z * sigma_eps).mean(0) + 2 * torch.exp(2 * log_sigma))
            top = torch.cat([h_mm, h_ms], dim=-1)
            bottom = torch.cat([h_ms.transpose(-1, -2), h_ss], dim=-1)
            return torch.cat([top, bottom], dim=-2)

    def _decoder_layers(self, params: dict[str, torch.Tensor] | None
                        ) -> list[tuple[torch.Tensor, torch.Tensor | None] | nn.Module]:
        """The decoder as (weight, bias) pairs (from ``params`` when given) and elementwise activations."""
        layers: list[tuple[torch.Tensor, torch.Tensor | None] | nn.Module] = []
        for name, layer in self.decoder.named_children():
            if isinstance(layer, nn.Linear):
                weights = (layer.weight, layer.bias) if params is None else \
                    (params[f"decoder.{name}.weight"], params.get(f"decoder.{name}.bias"))
                layers.append(weights)
            elif isinstance(layer, ELEMENTWISE):
                layers.append(layer)
            else:
                raise ValueError(f"GaussianVAE: decoder layer {name} ({type(layer).__name__}) is neither Linear nor "
                                 f"an elementwise activation {[c.__name__ for c in ELEMENTWISE]}; the latent-space "
                                 "Hessian needs one of those (or use model.inner.curvature=autodiff)")
        if self.sigmoid_output:
            layers.append(nn.Sigmoid())
        return layers

    def reconstruction_derivatives(self, z: torch.Tensor, x: torch.Tensor, log_gamma: torch.Tensor,
                                   params: dict[str, torch.Tensor] | None = None
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient (N, d) and exact Hessian (N, d, d) of l(z) = ||x - mu_x(z)||^2 / (2 gamma) at N points.

        The forward pass carries each layer's Jacobian w.r.t. z (a Linear multiplies it by W, an
        elementwise activation scales it by a'); the backward pass pulls the gradient g back and
        collects the curvature: the loss adds J^T J / gamma at the output, every activation
        J^T diag(g * a'') J at its input. Weights on the same Jacobian are merged, so the one large
        operation is the Jacobian through the last Linear (d times that layer's forward). At MNIST
        size this is ~4x faster than d reverse-over-reverse Hessian-vector products.
        """
        layers = self._decoder_layers(params)
        n, d = z.shape
        # jac (d, N, width): the Jacobian of h w.r.t. z, direction-major so that scaling it by a
        # per-point vector broadcasts over the leading dim only (a middle-dim broadcast is several
        # times slower on CPU); None is the identity. An activation's a' is applied lazily, by the
        # next Linear: after the last activation the Jacobian is not needed.
        h, jac, scale = z, None, None
        tape = []
        for layer in layers:
            if isinstance(layer, tuple):
                weight, bias = layer
                h = torch.nn.functional.linear(h, weight, bias)
                if jac is None and scale is None:
                    jac = weight.T.unsqueeze(1).expand(d, n, weight.shape[0])
                else:
                    if jac is None:
                        jac = torch.eye(d, dtype=z.dtype, device=z.device).unsqueeze(1).expand(d, n, d)
                    jac = torch.nn.functional.linear(jac if scale is None else jac * scale, weight)
                scale = None
                tape.append(("linear", weight, jac))
            else:
                h, d1, d2 = _elementwise_derivatives(layer, h)
                tape.append(("activation", d1, d2))
                scale = d1 if scale is None else scale * d1
        inv_gamma = torch.exp(-log_gamma)
        grad = (h - x) * inv_gamma             # dl/dh at the output
        pending = inv_gamma.expand_as(h)       # curvature diag(pending) on the current Jacobian
        hess = torch.zeros(n, d, d, dtype=z.dtype, device=z.device)
        for kind, *entry in reversed(tape):
            if kind == "linear":               # flush the curvature on its output's Jacobian
                weight, jac_out = entry
                hess = hess + torch.einsum("inm,jnm->nij", jac_out * pending, jac_out)
                grad = grad @ weight
                pending = torch.zeros_like(grad)
            else:                              # the chain rule moves it to the activation's input
                d1, d2 = entry
                pending = pending * d1.square() + grad * d2
                grad = grad * d1
        return grad, hess + torch.diag_embed(pending)

    @torch.no_grad()
    def iwae_log_likelihood(self, x: torch.Tensor, lam: torch.Tensor, n_samples: int = 1000,
                            chunk: int = 100, generator: torch.Generator | None = None) -> torch.Tensor:
        """Importance-weighted estimate of log p(x) with proposal q = N(mu, sigma^2), per example.

        log p(x) >= log (1/K) sum_k p(x, z_k) / q(z_k), z_k ~ q; the bound tightens as K grows.
        Computed in chunks of `chunk` samples with a running log-sum-exp.
        """
        mu, log_sigma = split_lambda(lam)
        total = torch.full((x.shape[0],), -torch.inf, device=x.device, dtype=x.dtype)
        log_gamma = self.clamped_log_gamma()
        done = 0
        while done < n_samples:
            k = min(chunk, n_samples - done)
            eps = self.sample_eps(x.shape[0], k, generator=generator, like=x)
            z = mu + torch.exp(log_sigma) * eps
            log_px_z = gaussian_log_likelihood(x, self.decode(z), log_gamma)
            log_pz = -0.5 * (z.pow(2) + LOG_2PI).sum(-1)
            log_qz = -0.5 * (eps.pow(2) + LOG_2PI).sum(-1) - log_sigma.sum(-1)
            total = torch.logaddexp(total, torch.logsumexp(log_px_z + log_pz - log_qz, dim=0))
            done += k
        return total - math.log(n_samples)
