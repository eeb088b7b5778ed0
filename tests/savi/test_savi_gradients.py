"""SAVI gradients: the IFT equals unrolling to convergence and finite differences; the envelope
theorem (no proximal term -> no encoder gradient); divergence falls back to lambda_0."""

from __future__ import annotations

import warnings

import pytest
import torch

from ift.implicit.minimize import MinimizeDivergenceWarning
from ift.savi.module import SAVIModule


def tiny_module(mode: str, eta: float | None = 1.0, steps: int = 400, **inner) -> SAVIModule:
    torch.manual_seed(0)
    module = SAVIModule(
        input_shape=[1, 2, 3], mode=mode, latent_dim=2, hidden=[5],
        gamma={"init": 0.5, "learn": True}, amortized_weight=0.0,
        inner={"method": "sgd", "lr": 0.2, "momentum": 0.5, "clip": None, "eta": eta, "max_iter": steps,
               "tol": 0.0, "nonstationary": "ift", **inner},
        ift={"linear_solver": "cg", "tol": 1e-12, "max_iter": 200},
    )
    return module.double()


def batch():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(4, 6, generator=gen, dtype=torch.float64)
    eps = torch.randn(1, 4, 2, generator=gen, dtype=torch.float64)
    return x, eps


def outer_loss(module: SAVIModule, x, eps) -> torch.Tensor:
    """-ELBO at the refined lambda (same noise as the inner problem: a deterministic function)."""
    result = module.refine(x, module.vae.encode(x), eps)
    return -module.vae.elbo(x, result.x, eps).sum()


def grads(module: SAVIModule, x, eps) -> dict[str, torch.Tensor]:
    module.zero_grad()
    outer_loss(module, x, eps).backward()
    return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in module.named_parameters()}


def flat(g: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
    return torch.cat([v.flatten() for k, v in g.items() if k.startswith(prefix)])


def test_ift_gradient_equals_unrolled_to_convergence():
    x, eps = batch()
    ift = tiny_module("savi_ift")
    unrolled = tiny_module("savi_unrolled")
    g_ift, g_unr = grads(ift, x, eps), grads(unrolled, x, eps)
    for prefix in ("vae.encoder", "vae.decoder", "vae.log_gamma"):
        a, b = flat(g_ift, prefix), flat(g_unr, prefix)
        cos = torch.nn.functional.cosine_similarity(a, b, dim=0)
        rel = (a - b).norm() / b.norm()
        assert cos > 0.999 and rel < 1e-3, (prefix, float(cos), float(rel))
    assert flat(g_ift, "vae.encoder").norm() > 1e-3  # the proximal term gives the encoder a signal


def test_ift_gradient_equals_finite_differences():
    x, eps = batch()
    module = tiny_module("savi_ift", steps=3000, tol=1e-11)  # FD needs lambda* to ~1e-11
    g = grads(module, x, eps)
    h = 1e-6
    checked = 0
    names = ["vae.encoder.0.weight", "vae.encoder.2.bias", "vae.decoder.2.weight", "vae.log_gamma"]
    for name, param in module.named_parameters():
        if name not in names:
            continue
        for idx in [0, param.numel() - 1]:
            with torch.no_grad():
                flat_p = param.view(-1)
                old = flat_p[idx].item()
                flat_p[idx] = old + h
                plus = outer_loss(module, x, eps).item()
                flat_p[idx] = old - h
                minus = outer_loss(module, x, eps).item()
                flat_p[idx] = old
            fd = (plus - minus) / (2 * h)
            assert g[name].view(-1)[idx].item() == pytest.approx(fd, rel=1e-4, abs=1e-6), (name, idx)
            checked += 1
    assert checked == 8


def test_without_proximal_term_the_encoder_gets_no_gradient_at_the_optimum():
    """Envelope theorem: d lambda*/d lambda_0 = 0, so only unconverged unrolling reaches the encoder."""
    x, eps = batch()
    ift = tiny_module("savi_ift", eta=None, steps=1500)
    assert flat(grads(ift, x, eps), "vae.encoder").abs().max() == 0
    short = flat(grads(tiny_module("savi_unrolled", eta=None, steps=3), x, eps), "vae.encoder").norm()
    long = flat(grads(tiny_module("savi_unrolled", eta=None, steps=1500), x, eps), "vae.encoder").norm()
    assert short > 1e-2 and long < 1e-3 * short


def test_default_amortized_weight_trains_the_encoder_when_no_gradient_reaches_it():
    common = dict(input_shape=[1, 2, 3], latent_dim=2, hidden=[5])
    assert SAVIModule(mode="savi_ift", inner={"eta": None}, **common).amortized_weight == 1.0
    assert SAVIModule(mode="svi", **common).amortized_weight == 1.0
    assert SAVIModule(mode="savi_ift", inner={"eta": 1.0}, **common).amortized_weight == 0.0


@pytest.mark.parametrize("mode", ["svi", "savi_unrolled", "savi_ift"])
def test_divergent_inner_loop_falls_back_to_lambda0_and_keeps_gradients_finite(mode):
    x, eps = batch()
    module = tiny_module(mode, steps=30, lr=1e6)  # absurd inner lr
    with pytest.warns(MinimizeDivergenceWarning, match="fall back to x0"):
        lam0 = module.vae.encode(x)
        result = module.refine(x, lam0, eps)
    assert result.diverged.all()
    torch.testing.assert_close(result.x, lam0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MinimizeDivergenceWarning)
        g = grads(module, x, eps)
    assert all(torch.isfinite(v).all() for v in g.values())


def test_bad_inner_settings_are_clear_errors():
    common = dict(input_shape=[1, 2, 3], latent_dim=2, hidden=[5])
    with pytest.raises(ValueError, match="model.inner.method must be one of newton, sgd, adam, got 'lbfgs'"):
        SAVIModule(mode="savi_ift", inner={"method": "lbfgs"}, **common)
    with pytest.raises(ValueError, match="model.inner.eta"):
        SAVIModule(mode="savi_ift", inner={"eta": 0.0}, **common)
    with pytest.raises(ValueError, match=r"model.ift has unknown keys \['tolerance'\]"):
        SAVIModule(mode="savi_ift", ift={"tolerance": 1e-3}, **common)
    with pytest.raises(ValueError, match="model.mode"):
        SAVIModule(mode="savi", **common)


def test_batch_of_the_wrong_shape_is_a_clear_error():
    module = SAVIModule(input_shape=[1, 8, 8], mode="vae", latent_dim=2, hidden=[5])
    with pytest.raises(ValueError, match=r"model.input_shape=\(1, 8, 8\)"):
        module.training_step((torch.rand(4, 1, 28, 28), torch.zeros(4)), 0)


def test_kl_warmup_and_outer_gradient_clipping():
    common = dict(input_shape=[1, 2, 3], latent_dim=2, hidden=[5], mode="vae")
    module = SAVIModule(kl_warmup_steps=10, kl_warmup_start=0.1, grad_clip=0.5, **common)
    steps = iter([0, 5, 10, 50])

    class Trainer:  # global_step is read from the trainer
        @property
        def global_step(self):
            return next(steps)

    module._trainer = Trainer()
    assert [module.kl_weight() for _ in range(4)] == pytest.approx([0.1, 0.55, 1.0, 1.0])
    for p in module.parameters():
        p.grad = torch.ones_like(p)
    module.on_before_optimizer_step(None)
    total = torch.cat([p.grad.flatten() for p in module.parameters()]).norm()
    assert float(total) == pytest.approx(0.5, rel=1e-5)
    with pytest.raises(ValueError, match="model.grad_clip"):
        SAVIModule(grad_clip=0.0, **common)
    with pytest.raises(ValueError, match="model.kl_warmup"):
        SAVIModule(kl_warmup_steps=-1, **common)
