"""The inner solve at MNIST-like curvature (784-dim data, gamma ~ 0.02): the default savi_ift solve
reaches its tolerance, the IFT gradient equals unrolling to convergence, the non-stationary policy
fires on a truncated solve; and the latent-space Hessian equals the autodiff one.

The decoder is trained for 300 steps (a few seconds) on data drawn from a random 8-dimensional
"teacher" decoder: its curvature matches a VAE after 400 real MNIST batches (largest Hessian
eigenvalue ~100 per example, some negative eigenvalues at lambda_0, first-order steps at lr 0.1 do
not converge in 50 steps), without needing the MNIST files.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from omegaconf import OmegaConf

from ift.config import compose_config, module_config
from ift.implicit import batched_hessian
from ift.implicit import proximal_objective
from ift.savi.inner import InnerConfig, refine
from ift.savi.model import mlp
from ift.savi.module import NonStationaryError, NonStationaryWarning, SAVIModule


def mnist_like(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    teacher = mlp([8, 64, 784])
    with torch.no_grad():
        for p in teacher.parameters():
            scale = 1.5 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.5
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
        x = torch.sigmoid(teacher(torch.randn(n, 8, generator=gen)))
        return (x + 0.05 * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def default_cfg(model: str = "savi_ift", tmp_path=None) -> dict:
    cfg = compose_config("train", [f"model={model}", "logger=none"], tmp_path or "/tmp/ift_savi_cfg")
    return OmegaConf.to_container(module_config(cfg.model), resolve=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These small batched ops run several times faster on one thread on a shared 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """A VAE briefly trained (mode vae) on the MNIST-like data, and a test batch."""
    cfg = default_cfg(tmp_path=tmp_path_factory.mktemp("cfg"))
    data = mnist_like(2304)
    torch.manual_seed(0)
    module = SAVIModule(input_shape=[1, 28, 28], mode="vae", latent_dim=8, hidden=[128, 128],
                        gamma={"init": 0.02}, inner=cfg["inner"], ift=cfg["ift"])
    opt = torch.optim.Adam(module.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(300):
        x = data[torch.randint(0, 2048, (128,), generator=gen)]
        loss = -module.vae.elbo(x, module.vae.encode(x), module.vae.sample_eps(128, 1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = data[2048:]
    eps = torch.randn(4, x.shape[0], 8, generator=torch.Generator().manual_seed(2))
    return module, cfg, x, eps


def neg_objective(module, x, eps, lam0, eta=1.0):
    params = {k: v.detach() for k, v in module.vae.generative_params().items()}
    return lambda lam: proximal_objective(lambda l: -module.vae.elbo(x, l, eps, params), lam0, eta)(lam)


def test_default_inner_solve_is_stationary_at_mnist_curvature(trained):
    module, cfg, x, eps = trained
    assert 0.015 < float(module.vae.gamma.detach()) < 0.03
    lam0 = module.vae.encode(x).detach()
    hess = batched_hessian(neg_objective(module, x, eps, lam0), lam0)[2]
    eig = torch.linalg.eigvalsh(hess)
    assert eig[:, -1].median() > 50 and (eig[:, 0] < 0).any()  # stiff, and indefinite at lambda_0
    params = {k: v.detach() for k, v in module.vae.generative_params().items()}
    result = refine(module.vae, x, lam0, eps, params, InnerConfig(**cfg["inner"]), create_graph=False)
    assert cfg["inner"]["method"] == "newton"
    assert result.converged.float().mean() >= 0.99, result.stationarity.max()
    assert not result.diverged.any()
    # The first-order loop of the previous default (lr 0.1, 50 steps) does not get there.
    sgd = InnerConfig(**{**cfg["inner"], "method": "sgd", "lr": 0.1, "max_iter": 50})
    first_order = refine(module.vae, x, lam0, eps, params, sgd, create_graph=False)
    assert first_order.converged.float().mean() < 0.5
    assert (first_order.value >= result.value - 1e-3).all()  # Newton's J is at least as high


def test_latent_space_hessian_equals_autodiff_and_gauss_newton_drops_only_the_residual_term(trained):
    module, _, x, eps = trained
    vae = module.vae.double()
    try:
        x64, eps64 = x[:16].double(), eps[:, :16].double()
        lam = vae.encode(x64).detach() + 0.1
        exact = vae.neg_elbo_hessian(x64, lam, eps64)
        auto = batched_hessian(lambda l: -vae.elbo(x64, l, eps64), lam)[2]
        torch.testing.assert_close(exact, auto, rtol=1e-9, atol=1e-8)
        gauss_newton = vae.neg_elbo_hessian(x64, lam, eps64, exact=False)
        assert ((gauss_newton - exact).norm() / exact.norm()) > 1e-3  # a nonlinear decoder: they differ
    finally:
        module.vae.float()


def test_gauss_newton_is_exact_for_a_linear_decoder():
    torch.manual_seed(0)
    module = SAVIModule(input_shape=[1, 4, 5], mode="vae", latent_dim=3, hidden=[]).double()
    module.vae.sigmoid_output = False  # mu_x(z) = W z + b: no decoder curvature
    x = torch.rand(6, 20, dtype=torch.float64)
    eps = torch.randn(2, 6, 3, dtype=torch.float64)
    lam = torch.randn(6, 6, dtype=torch.float64)
    torch.testing.assert_close(module.vae.neg_elbo_hessian(x, lam, eps, exact=False),
                               module.vae.neg_elbo_hessian(x, lam, eps))


def test_ift_gradient_equals_unrolled_to_convergence_at_mnist_curvature(trained):
    """float64, 16 examples; both modes run the default damped Newton to a tight tolerance."""
    module, cfg, x, eps = trained
    x64, eps64 = x[:16].double(), eps[:, :16].double()
    grads = {}
    for mode in ("savi_ift", "savi_unrolled"):
        other = SAVIModule(input_shape=[1, 28, 28], mode=mode, latent_dim=8, hidden=[128, 128],
                           gamma={"init": 0.02}, inner={**cfg["inner"], "tol": 1e-10, "max_iter": 40},
                           ift={**cfg["ift"], "tol": 1e-12, "max_iter": 200}, amortized_weight=0.0)
        other.load_state_dict(module.state_dict())
        other = other.double()
        result = other.refine(x64, other.vae.encode(x64), eps64)
        assert result.converged.all()
        (-other.vae.elbo(x64, result.x, eps64).sum()).backward()
        grads[mode] = {n: p.grad for n, p in other.named_parameters()}
    for prefix in ("vae.encoder", "vae.decoder", "vae.log_gamma"):
        a = torch.cat([g.flatten() for n, g in grads["savi_ift"].items() if n.startswith(prefix)])
        b = torch.cat([g.flatten() for n, g in grads["savi_unrolled"].items() if n.startswith(prefix)])
        assert (a - b).norm() <= 1e-6 * b.norm(), (prefix, float((a - b).norm() / b.norm()))
    assert torch.cat([g.flatten() for n, g in grads["savi_ift"].items() if "encoder" in n]).norm() > 0


@pytest.mark.parametrize("policy", ["drop", "ift", "error"])
def test_nonstationary_policy_on_a_truncated_solve(trained, policy):
    module, cfg, x, eps = trained
    ift = SAVIModule(input_shape=[1, 28, 28], mode="savi_ift", latent_dim=8, hidden=[128, 128],
                     gamma={"init": 0.02}, inner={**cfg["inner"], "max_iter": 1, "nonstationary": policy},  # deliberately truncated
                     ift=cfg["ift"])
    ift.load_state_dict(module.state_dict())
    x, eps = x[:64], eps[:, :64]
    lam0 = ift.vae.encode(x)
    if policy == "error":
        with pytest.raises(NonStationaryError, match="model.inner.tol"):
            ift.refine(x, lam0, eps)
        return
    with pytest.warns(NonStationaryWarning, match=f"model.inner.nonstationary={policy}"):
        result = ift.refine(x, lam0, eps)
    bad = result.nonstationary
    assert bad.float().mean() > 0.5
    if policy == "drop":  # those examples train at lambda_0
        torch.testing.assert_close(result.x[bad], lam0[bad])
        assert float(ift.solves.last["inner"].fallback) == int(bad.sum())
    else:
        assert not torch.equal(result.x[bad], lam0[bad])
        assert float(ift.solves.last["inner"].fallback) == 0


def test_unknown_names_fail_at_start_up_naming_the_key():
    common = dict(input_shape=[1, 2, 3], latent_dim=2, hidden=[5])
    with pytest.raises(ValueError, match="model.inner.nonstationary must be one of drop, ift, error, got 'maybe'"):
        SAVIModule(mode="savi_ift", inner={"nonstationary": "maybe"}, **common)
    with pytest.raises(ValueError, match="model.inner.curvature must be one of exact, gauss_newton, autodiff, got 'bfgs'"):
        SAVIModule(mode="savi_ift", inner={"curvature": "bfgs"}, **common)
    with pytest.raises(ValueError, match="model.inner.tol=0"):
        SAVIModule(mode="savi_ift", inner={"tol": 0.0}, **common)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SAVIModule(mode="savi_ift", inner={"tol": 0.0, "nonstationary": "ift"}, **common)


def test_latent_space_hessian_is_differentiable_like_the_autodiff_one(trained):
    """Unrolled Newton differentiates the Hessian: its derivatives w.r.t. lambda and the decoder
    weights equal those of the generic autodiff Hessian (float64)."""
    module, _, x, eps = trained
    vae = module.vae.double()
    try:
        x64, eps64 = x[:6].double(), eps[:, :6].double()
        params = {k: v.detach().clone().requires_grad_(True) for k, v in vae.generative_params().items()}
        lam = (vae.encode(x64).detach() + 0.1).requires_grad_(True)
        probe = torch.randn(6, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
        inputs = [lam, params["decoder.0.weight"], params["decoder.4.weight"], params["log_gamma"]]
        latent = vae.neg_elbo_hessian(x64, lam, eps64, params, create_graph=True)
        auto = batched_hessian(lambda l: -vae.elbo(x64, l, eps64, params), lam, create_graph=True)[2]
        for a, b in zip(torch.autograd.grad((latent * probe).sum(), inputs),
                        torch.autograd.grad((auto * probe).sum(), inputs)):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)
    finally:
        module.vae.float()


def test_latent_space_hessian_refuses_a_decoder_it_cannot_differentiate_layerwise():
    module = SAVIModule(input_shape=[1, 2, 3], mode="vae", latent_dim=2, hidden=[5])
    module.vae.decoder[1] = torch.nn.LayerNorm(5)  # mixes units: not elementwise
    with pytest.raises(ValueError, match="LayerNorm.*curvature=autodiff"):
        module.vae.neg_elbo_hessian(torch.rand(3, 6), torch.randn(3, 4), torch.randn(1, 3, 2))


def test_backward_preconditioned_by_newtons_hessian_equals_plain_cg(trained, monkeypatch):
    """savi_ift's backward CG preconditioned by the forward's last Hessian: same gradient as plain
    CG (float64, tight tolerances), in at most 3 iterations instead of many."""
    module, cfg, x, eps = trained
    x64, eps64 = x[:16].double(), eps[:, :16].double()
    results = {}
    for variant in ("preconditioned", "plain"):
        other = SAVIModule(input_shape=[1, 28, 28], mode="savi_ift", latent_dim=8, hidden=[128, 128],
                           gamma={"init": 0.02}, inner={**cfg["inner"], "tol": 1e-10, "max_iter": 40},
                           ift={**cfg["ift"], "tol": 1e-12, "max_iter": 200}, amortized_weight=0.0)
        other.load_state_dict(module.state_dict())
        other = other.double()
        if variant == "plain":
            monkeypatch.setattr(SAVIModule, "_backward_solver", lambda self, hessian: self.ift_cfg.solver_kwargs())
        result = other.refine(x64, other.vae.encode(x64), eps64)
        assert result.converged.all() and torch.isfinite(result.hessian).all()
        (-other.vae.elbo(x64, result.x, eps64).sum()).backward()
        info = other.solves.last["ift"]
        assert info.all_converged
        results[variant] = (torch.cat([p.grad.flatten() for p in other.parameters()]), info.iterations)
    (g_pre, it_pre), (g_plain, it_plain) = results["preconditioned"], results["plain"]
    assert (g_pre - g_plain).norm() <= 1e-9 * g_plain.norm()
    assert it_pre.max() <= 3 and it_plain.min() > 5
