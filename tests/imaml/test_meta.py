"""iMAML's implicit meta-gradient against ground truth, MAML's unrolled one, the network, the policies."""

import pytest
import torch
from torch import nn

from ift.data.sinusoid import SinusoidDataModule
from ift.imaml import (
    FunctionalMLP,
    InnerSolver,
    NonStationaryError,
    gradient_steps,
    imaml_adapt,
    meta_loss,
    task_mse,
    task_objective,
)
from ift.implicit.core import IFTConfig
from ift.telemetry.saved_tensors import SavedTensorCounter

DT = torch.float64
TIGHT = InnerSolver(method="sgd", lr=0.05, momentum=0.9, max_iter=5000, tol=1e-11, nonstationary="error")
TIGHT_CG = IFTConfig(tol=1e-12, max_iter=2000)


def tasks(n_tasks: int, seed: int = 0, dtype=DT):
    data = SinusoidDataModule(shots=10, query=10, seed=seed)
    batch = next(iter(torch.utils.data.DataLoader(data.tasks("train"), batch_size=n_tasks)))
    return [t.to(dtype) for t in batch]


def meta_gradient_implicit(net, theta, batch, lam, inner=TIGHT):
    xs, ys, xq, yq = batch
    theta = theta.detach().requires_grad_(True)
    phi, result = imaml_adapt(net, theta, xs, ys, lam, inner, TIGHT_CG)
    (grad,) = torch.autograd.grad(task_mse(net, phi, xq, yq).mean(), theta)
    return grad, phi.detach(), result


def meta_gradient_unrolled(net, theta, batch, lam, steps, lr):
    """Backpropagation through ``steps`` gradient steps on the proximal objective (to convergence)."""
    xs, ys, xq, yq = batch
    theta = theta.detach().requires_grad_(True)
    phi = theta.expand(len(xs), -1)
    for _ in range(steps):
        (g,) = torch.autograd.grad(task_objective(net, phi, theta, xs, ys, lam).sum(), phi, create_graph=True)
        phi = phi - lr * g
    (grad,) = torch.autograd.grad(task_mse(net, phi, xq, yq).mean(), theta)
    return grad, phi.detach()


def test_functional_mlp_equals_torch_layers_per_task():
    net = FunctionalMLP((5, 3), activation="tanh")
    phi = torch.randn(2, net.num_params, dtype=DT)
    x = torch.randn(2, 4, 1, dtype=DT)
    for b in range(2):
        layers, offset = [], 0
        for fan_out, fan_in in net.layers:
            lin = nn.Linear(fan_in, fan_out).to(DT)
            with torch.no_grad():
                lin.weight.copy_(phi[b, offset : offset + fan_out * fan_in].view(fan_out, fan_in))
                offset += fan_out * fan_in
                lin.bias.copy_(phi[b, offset : offset + fan_out])
                offset += fan_out
            layers += [lin, nn.Tanh()]
        reference = nn.Sequential(*layers[:-1])
        torch.testing.assert_close(net(phi, x)[b], reference(x[b]))
    shared = net(phi[0], x)  # an unbatched phi is shared by every task
    torch.testing.assert_close(shared[1], net(phi[:1], x[1:])[0])


def test_implicit_meta_gradient_equals_dense_formula():
    # d L_query(phi*) / d theta = lam (H + lam I)^{-1} grad L_query(phi*), H = Hessian of L_support at phi*.
    net, lam = FunctionalMLP((8, 8)), 2.0
    theta = net.init(torch.Generator().manual_seed(1), dtype=DT)
    batch = tasks(3)
    grad, phi, _ = meta_gradient_implicit(net, theta, batch, lam)
    xs, ys, xq, yq = batch
    expected = torch.zeros_like(theta)
    for b in range(3):
        support = lambda p: task_mse(net, p.unsqueeze(0), xs[b : b + 1], ys[b : b + 1]).sum()
        query = lambda p: task_mse(net, p.unsqueeze(0), xq[b : b + 1], yq[b : b + 1]).sum()
        H = torch.func.hessian(support)(phi[b])
        v = torch.func.grad(query)(phi[b])
        expected += lam * torch.linalg.solve(H + lam * torch.eye(len(theta), dtype=DT), v) / 3
    torch.testing.assert_close(grad, expected, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize(
    "hidden,steps,lr", [((8, 8), 800, 0.05), ((40, 40), 1000, 0.02)], ids=["small", "finn_et_al_size_n1761"]
)
def test_implicit_meta_gradient_equals_unrolling_to_convergence(hidden, steps, lr):
    # Gradient descent on the proximal objective, unrolled until it has converged, differentiates
    # the same map theta -> phi*(theta) as the IFT (lam = 5 keeps the unrolling short).
    net, lam = FunctionalMLP(hidden), 5.0
    theta = net.init(torch.Generator().manual_seed(2), dtype=DT)
    batch = tasks(4, seed=1)
    grad, phi, result = meta_gradient_implicit(net, theta, batch, lam)
    assert bool(result.converged.all())
    unrolled, phi_unrolled = meta_gradient_unrolled(net, theta, batch, lam, steps, lr)
    torch.testing.assert_close(phi_unrolled, phi, rtol=1e-6, atol=1e-7)  # the same minimiser
    rel = (grad - unrolled).norm() / unrolled.norm()
    assert rel < 1e-6, rel
    # and not trivially: a short unrolling is far from it
    short, _ = meta_gradient_unrolled(net, theta, batch, lam, steps=5, lr=lr)
    assert (short - grad).norm() / grad.norm() > 1e-2


def test_maml_meta_gradient_matches_finite_differences():
    net = FunctionalMLP((6, 6))
    theta = net.init(torch.Generator().manual_seed(3), dtype=DT).requires_grad_(True)
    xs, ys, xq, yq = tasks(2)

    def loss(t):
        return task_mse(net, gradient_steps(net, t, xs, ys, steps=3, lr=0.05, create_graph=True), xq, yq).mean()

    assert torch.autograd.gradcheck(loss, (theta,), eps=1e-6, atol=1e-6)


def test_imaml_memory_does_not_grow_with_inner_iterations_and_maml_does():
    net, lam = FunctionalMLP((40, 40)), 2.0
    theta = net.init(torch.Generator().manual_seed(0)).requires_grad_(True)
    xs, ys, xq, yq = tasks(10, dtype=torch.float32)
    saved = {}
    for steps in (5, 50):
        with SavedTensorCounter() as c:
            phi, _ = imaml_adapt(net, theta, xs, ys, lam, InnerSolver(max_iter=steps, tol=1e-30, nonstationary="ift"))
            loss = task_mse(net, phi, xq, yq).mean()
        saved[("imaml", steps)] = c.live_bytes
        with SavedTensorCounter() as c:
            loss = task_mse(net, gradient_steps(net, theta, xs, ys, steps, 0.01, create_graph=True), xq, yq).mean()
        saved[("maml", steps)] = c.live_bytes
    assert saved[("imaml", 5)] == saved[("imaml", 50)]
    assert saved[("maml", 50)] > 8 * saved[("maml", 5)]
    assert saved[("maml", 5)] > saved[("imaml", 5)]


def test_nonstationary_tasks_are_reported_then_dropped_or_refused():
    net = FunctionalMLP((40, 40))
    theta = net.init(torch.Generator().manual_seed(0)).requires_grad_(True)
    xs, ys, xq, yq = tasks(5, dtype=torch.float32)
    few = dict(max_iter=3, tol=1e-6)
    with pytest.raises(NonStationaryError, match="model.inner"):
        imaml_adapt(net, theta, xs, ys, 2.0, InnerSolver(**few, nonstationary="error"))
    phi, result = imaml_adapt(net, theta, xs, ys, 2.0, InnerSolver(**few, nonstationary="drop"))
    assert not bool(result.converged.any())
    per_task = task_mse(net, phi, xq, yq)
    assert float(meta_loss(per_task, result.converged).detach()) == 0.0
    keep = torch.tensor([True, False, True, False, False])
    torch.testing.assert_close(meta_loss(per_task, keep), per_task[keep].mean())


@pytest.mark.parametrize(
    "kwargs,key",
    [(dict(nonstationary="skip"), "nonstationary"), (dict(method="lbfgs"), "method"), (dict(max_iter=0), "max_iter"),
     (dict(tol=0.0), "tol"), (dict(momentum=1.0), "momentum")],
)
def test_bad_inner_settings_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=f"model.inner.{key}"):
        InnerSolver(**kwargs)
