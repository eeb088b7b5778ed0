"""Explanations against closed forms on linear / one-hidden-layer models."""

import pytest
import torch
from torch import nn

from ift.saliency import (build_network, gradient, guided_backprop, infidelity, integrated_gradients, kernel_shap,
                          make_explanation, optimal_noisy_baseline, optimal_square, smooth)


def linear_model(d=16, classes=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, classes)).double()


def weights_for(model, target, shape):
    return model[1].weight[target].detach().view(shape)


X_SHAPE = (4, 1, 4, 4)
TARGET = torch.tensor([0, 2, 1, 2])


def test_grad_and_ig_closed_forms_on_linear_model():
    model = linear_model()
    x = torch.rand(X_SHAPE, dtype=torch.float64)
    w = weights_for(model, TARGET, X_SHAPE)
    assert torch.allclose(gradient(model)(x, TARGET), w)
    baseline = 0.3
    ig = integrated_gradients(model, n_steps=5, baseline=baseline, multiply_by_inputs=True)
    assert torch.allclose(ig(x, TARGET), (x - baseline) * w)
    assert torch.allclose(integrated_gradients(model, n_steps=5)(x, TARGET), w)  # path-averaged gradient


def test_gbp_closed_form_one_hidden_relu_layer():
    """GBP of f = w2^T relu(W1 x): W1^T [(W1 x > 0) * max(w2, 0)], unlike the gradient."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10, bias=False), nn.ReLU(), nn.Linear(10, 3, bias=False)).double()
    x = torch.randn(X_SHAPE, dtype=torch.float64)
    w1, w2 = model[1].weight.detach(), model[3].weight.detach()
    pre = x.flatten(1) @ w1.T
    expected = ((pre > 0) * w2[TARGET].clamp_min(0)) @ w1
    got = guided_backprop(model)(x, TARGET)
    assert torch.allclose(got.flatten(1), expected)
    assert not torch.allclose(got, gradient(model)(x, TARGET))


def test_gbp_refuses_models_without_relu_modules():
    with pytest.raises(ValueError, match="nn.ReLU"):
        guided_backprop(linear_model())


@pytest.mark.parametrize("arch,shape", [("madry_cnn", (1, 28, 28)), ("small_cnn", (1, 8, 8)),
                                        ("resnet", (3, 32, 32))])
def test_networks_use_one_relu_module_per_use(arch, shape):
    net = build_network(arch, shape, 10, **({"width": 0.25} if arch != "resnet" else {"depth": 8, "width": 0.5}))
    relus = [m for m in net.modules() if isinstance(m, nn.ReLU)]
    calls = []
    handles = [m.register_forward_hook(lambda m, i, o: calls.append(id(m))) for m in relus]
    out = net(torch.rand(2, *shape))
    assert out.shape == (2, 10)
    assert len(calls) == len(set(calls)) == len(relus) > 0  # every ReLU module is used exactly once
    for h in handles:
        h.remove()


def test_kernel_shap_on_linear_model_is_x_times_w():
    """A linear model is additive in the kept features, so the Shapley values are x * w (baseline 0)."""
    model = linear_model(d=4).float()  # captum's Lime fits in float32
    x = torch.rand(2, 1, 2, 2)
    t = torch.tensor([1, 0])
    torch.manual_seed(0)
    got = kernel_shap(model, n_samples=200)(x, t)
    assert torch.allclose(got, x * weights_for(model, t, (2, 1, 2, 2)), atol=1e-4)


def test_smoothgrad_is_mean_of_gradients_at_uniform_linf_samples():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.rand(X_SHAPE, dtype=torch.float64)
    sg = smooth(gradient(model), radius=0.3, n_samples=10, generator=torch.Generator().manual_seed(5))
    got = sg(x, TARGET)
    delta = (torch.rand((10, *X_SHAPE), generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2 - 1) * 0.3
    grad = gradient(model)
    expected = torch.stack([grad(x + d, TARGET) for d in delta]).mean(0)
    assert torch.allclose(got, expected)
    assert delta.abs().max() <= 0.3
    # on a linear model SmoothGrad is the gradient itself
    lin = linear_model()
    assert torch.allclose(smooth(gradient(lin), 0.5, 7)(x, TARGET), weights_for(lin, TARGET, X_SHAPE))


def test_optimal_explanations_recover_linear_model():
    model = linear_model()
    x = torch.rand(X_SHAPE, dtype=torch.float64)
    x[:, :, 0] = 0.0  # zero pixels: Appendix B.2 form still solvable
    w = weights_for(model, TARGET, X_SHAPE)
    nb = optimal_noisy_baseline(model, n_samples=300, max_batch=64)(x, TARGET)
    assert torch.allclose(nb, w, atol=1e-8)
    sq = optimal_square(model, square_sizes=(1, 2))(x, TARGET)
    assert torch.allclose(sq, x * w, atol=1e-8)


def test_optimal_explanations_have_lower_infd_than_grad_on_nonlinear_net():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3)).double()
    x = torch.rand(X_SHAPE, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    grad = gradient(model)(x, TARGET)
    nb = optimal_noisy_baseline(model, n_samples=4000, generator=g)(x, TARGET)
    infd_nb = infidelity(model, x, nb, "noisy_baseline", 4000, TARGET, generator=torch.Generator().manual_seed(9))
    infd_grad = infidelity(model, x, grad, "noisy_baseline", 4000, TARGET, generator=torch.Generator().manual_seed(9))
    assert (infd_nb < infd_grad).all()
    sq = optimal_square(model, square_sizes=(1, 4))(x, TARGET)
    infd_sq = infidelity(model, x, sq, "square", None, TARGET, square_sizes=(1, 4), global_attribution=True)
    infd_grad_sq = infidelity(model, x, grad, "square", None, TARGET, square_sizes=(1, 4))
    assert (infd_sq <= infd_grad_sq + 1e-12).all()


def test_make_explanation_names():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    for name in ("Grad", "Grad-SG", "IG", "IG-SG", "GBP", "GBP-SG"):
        e = make_explanation(name, model, sg_samples=3, ig_steps=3)
        assert e.name == name and not e.is_global
        assert e(x, torch.tensor([0, 1])).shape == x.shape
    assert make_explanation("SHAP", model).is_global and make_explanation("Square", model).is_global
    with pytest.raises(ValueError, match="explanation must be one of"):
        make_explanation("LIME", model)


def test_global_smoothgrad_variants():
    """Ours: x * mean grad f(x + d); the authors': mean[(x + d) * grad f(x + d)], on the same draws.
    On a linear model they are x * w and (x + mean d) * w."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.rand(X_SHAPE, dtype=torch.float64)
    delta = (torch.rand((6, *X_SHAPE), generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2 - 1) * 0.3
    grad = gradient(model)
    grads = torch.stack([grad(x + d, TARGET) for d in delta])
    kw = dict(sg_radius=0.3, sg_samples=6)
    ours = make_explanation("Grad-SG", model, sg_global="x_times_mean", generator=torch.Generator().manual_seed(5), **kw)
    authors = make_explanation("Grad-SG", model, sg_global="mean_of_products",
                               generator=torch.Generator().manual_seed(5), **kw)
    assert ours.is_global and authors.is_global
    assert torch.allclose(ours(x, TARGET), x * grads.mean(0))
    assert torch.allclose(authors(x, TARGET), ((x + delta) * grads).mean(0))
    lin = linear_model()
    w = weights_for(lin, TARGET, X_SHAPE)
    got = make_explanation("Grad-SG", lin, sg_global="mean_of_products", generator=torch.Generator().manual_seed(5),
                           **kw)(x, TARGET)
    assert torch.allclose(got, (x + delta.mean(0)) * w)
    local = make_explanation("Grad-SG", model, generator=torch.Generator().manual_seed(5), **kw)
    assert not local.is_global and torch.allclose(local(x, TARGET), grads.mean(0))
    with pytest.raises(ValueError, match="sg_global"):
        make_explanation("Grad-SG", model, sg_global="authors")
    with pytest.raises(ValueError, match="needs a local explanation"):
        smooth(kernel_shap(model, 10), multiply_by_inputs=True)
