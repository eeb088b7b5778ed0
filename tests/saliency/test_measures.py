"""INFD and SENS_max against closed forms and against captum on the same samples."""

import pytest
import torch
from captum.metrics import infidelity as captum_infidelity
from captum.metrics import sensitivity_max as captum_sensitivity_max
from torch import nn

from ift.saliency import infidelity, max_sensitivity
from ift.saliency.measures import (SENS_NORMALISATIONS, infidelity_from_perturbations, max_sensitivities,
                                   noisy_baseline_perturbations, perturbation_drops, square_drops,
                                   square_infidelity, square_masks)


def linear_model(c=1, h=4, w=4, classes=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, classes)).double()


def tanh_net(d=16, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 12), nn.Tanh(), nn.Linear(12, 3)).double()


def test_infd_of_exact_gradient_of_linear_model_is_zero():
    model = linear_model()
    x = torch.rand(5, 1, 4, 4, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 1, 0])
    grad = model[1].weight[target].detach().view(5, 1, 4, 4)
    for pert in ("noisy_baseline", "square"):
        infd = infidelity(model, x, grad, pert, n_samples=200 if pert == "noisy_baseline" else None,
                          target=target, square_sizes=(1, 3))
        assert torch.allclose(infd, torch.zeros(5, dtype=torch.float64), atol=1e-14)
    # a scaled gradient is still exact after optimal scaling; a wrong one is not
    infd = infidelity(model, x, 3.7 * grad, "noisy_baseline", n_samples=200, target=target)
    assert infd.max() < 1e-14
    infd = infidelity(model, x, torch.randn_like(grad), "noisy_baseline", n_samples=200, target=target)
    assert infd.min() > 1e-4


def test_infd_closed_form_on_fixed_perturbations():
    model = tanh_net()
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    expl = torch.randn_like(x)
    pert = noisy_baseline_perturbations(x, 40, generator=torch.Generator().manual_seed(1))
    got = infidelity_from_perturbations(model, x, expl, pert, target=1, max_batch=7)
    for b in range(3):
        f = lambda z: model(z)[:, 1]
        a = (pert[:, b] * expl[b]).flatten(1).sum(1)
        d = f(x[b:b + 1]) - f(x[b:b + 1] - pert[:, b])
        beta = (a * d).sum() / (a * a).sum()
        assert torch.allclose(got[b], ((beta * a - d) ** 2).mean(), rtol=1e-10)


def test_square_infidelity_matches_generic_form_with_x_times_z():
    """Appendix B.2: the binary form z^T (x * Phi) equals I^T Phi with I = x * z."""
    model = tanh_net()
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    x[:, :, 0, :] = 0.0  # zeros, as in MNIST
    expl = torch.randn_like(x)
    masks = square_masks(4, 4, (1, 3)).double()
    pert = x.unsqueeze(0) * masks.view(-1, 1, 1, 4, 4)
    ref = infidelity_from_perturbations(model, x, expl, pert, target=2)
    got = infidelity(model, x, expl, "square", n_samples=None, target=2, square_sizes=(1, 3))
    assert torch.allclose(got, ref, rtol=1e-10)
    assert masks.shape[0] == 16 + 9 + 4


def test_infidelity_equals_captum_normalized_on_same_samples():
    model = tanh_net()
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    expl = torch.randn_like(x)
    target = torch.tensor([0, 2, 1])
    n = 25
    pert = noisy_baseline_perturbations(x, n, generator=torch.Generator().manual_seed(3))
    ours = infidelity_from_perturbations(model, x, expl, pert, target=target)
    interleaved = pert.transpose(0, 1).reshape(3 * n, 1, 4, 4)  # captum repeats each example n times

    def perturb_fn(inputs):
        return interleaved, inputs - interleaved

    theirs = captum_infidelity(model, perturb_fn, x, expl, n_perturb_samples=n, target=target, normalize=True)
    assert torch.allclose(ours, theirs.double(), rtol=1e-8)


def test_sens_max_of_constant_explanation_is_zero():
    x = torch.rand(4, 1, 5, 5)
    const = torch.randn(1, 1, 5, 5)
    sens = max_sensitivity(lambda z: const.expand_as(z), x, radius=0.3, n_samples=20)
    assert torch.equal(sens, torch.zeros(4, dtype=torch.float64))


def test_sens_max_closed_form_for_identity_explanation():
    """Phi(x) = x: ||Phi(y) - Phi(x)|| = ||delta||, maximised near a corner of the ball."""
    x = torch.rand(3, 1, 2, 2, dtype=torch.float64) + 1.0
    noise = (torch.rand(30, 3, 1, 2, 2, dtype=torch.float64) * 2 - 1) * 0.1
    noise[7] = 0.1  # a corner: ||delta||_2 = 0.1 * sqrt(4)
    sens = max_sensitivity(lambda z: z, x, noise=noise, normalize="none")
    assert torch.allclose(sens, torch.full((3,), 0.2, dtype=torch.float64))
    rel = max_sensitivity(lambda z: z, x, noise=noise, normalize="input")
    assert torch.allclose(rel, 0.2 / x.flatten(1).norm(dim=1))


def test_sens_max_equals_captum_on_same_samples():
    model = tanh_net()
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    target = torch.tensor([1, 0, 2])

    def grad_fn(z, t):
        with torch.enable_grad():  # captum calls explanations under no_grad
            z = z.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(model(z).gather(1, t.view(-1, 1)).sum(), z)
        return g

    def captum_grad_fn(inputs, target):  # captum passes and expects tuples of tensors
        return (grad_fn(inputs[0] if isinstance(inputs, tuple) else inputs, target),)

    n = 12
    noise = (torch.rand(n, 3, 1, 4, 4, dtype=torch.float64) * 2 - 1) * 0.2
    ours = max_sensitivity(grad_fn, x, target=target, noise=noise, max_batch=5)
    interleaved = noise.transpose(0, 1).reshape(3 * n, 1, 4, 4)  # captum repeats each example n times

    def perturb_fn(inputs, radius):
        return inputs + interleaved

    theirs = captum_sensitivity_max(captum_grad_fn, x, perturb_func=perturb_fn, n_perturb_samples=n,
                                    target=target)
    assert torch.allclose(ours, theirs.double(), rtol=1e-8)


def test_bad_inputs_raise():
    model = linear_model()
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="perturbation"):
        infidelity(model, x, x, "gaussian", target=0)
    with pytest.raises(ValueError, match="target"):
        infidelity(model, x, x, "noisy_baseline", n_samples=3)
    with pytest.raises(ValueError, match="shape"):
        infidelity(model, x, x[:1], "noisy_baseline", n_samples=3, target=0)
    with pytest.raises(ValueError, match="normalize"):
        max_sensitivity(lambda z: z, x, normalize="l1")
    with pytest.raises(ValueError, match="shaped like"):
        max_sensitivity(lambda z: z[:, :, :2], x, n_samples=2)


def test_sens_normalisations_closed_forms_and_2019_replay():
    """Phi(x) = x on fixed samples: unit compares directions, none is ||delta||, input divides by
    ||x||, and input_2019 replays the authors' 2019 loop m <- max(m, d_k) / ||x|| in draw order."""
    x = torch.rand(3, 1, 2, 2, dtype=torch.float64) + 0.5
    noise = (torch.rand(6, 3, 1, 2, 2, dtype=torch.float64) * 2 - 1) * 0.1
    out = max_sensitivities(lambda z: z, x, noise=noise, normalizations=SENS_NORMALISATIONS, max_batch=4)
    d = noise.flatten(2).norm(dim=2)  # (n, B)
    norm = x.flatten(1).norm(dim=1)
    assert torch.allclose(out["none"], d.max(0).values)
    assert torch.allclose(out["input"], d.max(0).values / norm)
    y = (x + noise).flatten(2)
    unit = (y / y.norm(dim=2, keepdim=True) - (x.flatten(1) / norm.unsqueeze(1))).norm(dim=2)
    assert torch.allclose(out["unit"], unit.max(0).values)
    assert (out["unit"] <= 2).all()
    running = torch.full((3,), -torch.inf, dtype=torch.float64)
    for dk in d:  # the 2019 code, sample by sample
        running = torch.maximum(running, dk) / norm
    assert torch.allclose(out["input_2019"], running)
    # every normalisation agrees with the single-normalisation call on the same samples
    for name in SENS_NORMALISATIONS:
        assert torch.allclose(max_sensitivity(lambda z: z, x, noise=noise, normalize=name), out[name])
    # both normalised forms ignore a constant scale of the explanation
    scaled = max_sensitivities(lambda z: 3 * z, x, noise=noise, normalizations=("unit", "input"))
    assert torch.allclose(scaled["unit"], out["unit"]) and torch.allclose(scaled["input"], out["input"])
    with pytest.raises(ValueError, match="normalize must be one of"):
        max_sensitivities(lambda z: z, x, noise=noise, normalizations=("input", "l1"))


def test_cached_drops_give_the_same_infidelity():
    model = tanh_net()
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    target = torch.tensor([0, 2, 1])
    phi = torch.randn_like(x)
    masks = square_masks(4, 4, (1, 3))
    drops = square_drops(model, x, masks, target, max_batch=7)
    assert drops.shape == (masks.shape[0], 3)
    direct = square_infidelity(model, x, x * phi, masks, target, max_batch=7)
    assert torch.allclose(square_infidelity(model, x, x * phi, masks, target, drops=drops), direct)
    pert = noisy_baseline_perturbations(x, 40, generator=torch.Generator().manual_seed(0))
    drops_nb = perturbation_drops(model, x, pert, target)
    direct_nb = infidelity_from_perturbations(model, x, phi, pert, target)
    assert torch.allclose(infidelity_from_perturbations(model, x, phi, pert, target, drops=drops_nb), direct_nb)
    with pytest.raises(ValueError, match="drops must be"):
        square_infidelity(model, x, x * phi, masks, target, drops=drops[:-1])
