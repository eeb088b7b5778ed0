"""OptNetLayer and the simplex heads against closed forms."""

import pytest
import torch

from ift.optnet import OptNetLayer, SoftmaxHead, SparsemaxHead, solve_qp, sparsemax_closed_form, sparsemax_qp


def _logits(seed, batch=6, k=5):
    return torch.randn(batch, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


def test_sparsemax_closed_form_known_values():
    theta = torch.tensor([[2.0, 1.0, -1.0], [0.0, 0.0, 0.0], [0.3, 0.1, 0.0]], dtype=torch.float64)
    expected = torch.tensor([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.3, 0.2]], dtype=torch.float64)
    torch.testing.assert_close(sparsemax_closed_form(theta), expected)


def test_sparsemax_through_the_qp_layer_equals_closed_form():
    theta = _logits(0)
    x = SparsemaxHead()(theta)
    torch.testing.assert_close(x, sparsemax_closed_form(theta), atol=1e-7, rtol=0)
    assert (sparsemax_closed_form(theta) == 0).any()  # the test data exercises sparse outputs


def test_sparsemax_jacobian_matches_closed_form():
    theta = _logits(1, batch=4)
    for i in range(4):
        J = torch.autograd.functional.jacobian(lambda t: sparsemax_qp(t[None], tol=1e-12)[0], theta[i])
        support = (sparsemax_closed_form(theta[i]) > 0).double()
        J_ref = torch.diag(support) - torch.outer(support, support) / support.sum()
        torch.testing.assert_close(J, J_ref, atol=1e-6, rtol=0)


def test_softmax_head_equals_softmax_and_its_jacobian():
    theta = _logits(2, batch=3)
    torch.testing.assert_close(SoftmaxHead()(theta), theta.softmax(-1))
    J = torch.autograd.functional.jacobian(lambda t: SoftmaxHead()(t[None])[0], theta[0])
    x = theta[0].softmax(-1)
    torch.testing.assert_close(J, torch.diag(x) - torch.outer(x, x))


def test_optnet_layer_is_feasible_and_matches_solve_qp():
    torch.manual_seed(0)
    layer = OptNetLayer(n=6, n_ineq=8, n_eq=2).double()
    with torch.no_grad():
        layer.z0.normal_()
        layer.L.add_(0.3 * torch.randn(6, 6, dtype=torch.float64))
    q = torch.randn(5, 6, dtype=torch.float64)
    z = layer(q)
    Q, G, h, A, b = layer.qp_parameters()
    torch.testing.assert_close(z, solve_qp(Q, q, G, h, A, b))
    assert (G @ layer.z0 <= h).all() and torch.allclose(A @ layer.z0, b)  # z0 feasible by construction
    assert (G @ z.detach().T <= h[:, None] + 1e-8).all()
    assert bool(layer.solves.last["qp"].converged.all())


def test_optnet_layer_gradcheck_through_its_parameters():
    torch.manual_seed(1)
    layer = OptNetLayer(n=3, n_ineq=4, n_eq=1).double()
    layer.solve_kwargs = {"tol": 1e-12}
    q = torch.randn(2, 3, dtype=torch.float64)
    names = [name for name, _ in layer.named_parameters()]

    def f(*params):
        return torch.func.functional_call(layer, dict(zip(names, params)), (q,))

    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    layer(q)
    status = layer.solves.last["qp"]
    assert bool(status.converged.all())
    # strict complementarity (no weakly active constraint), else z*(params) has a kink
    assert bool(((status.lam > 1e-6) | (status.slack > 1e-6)).all())
    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-5, rtol=1e-3, fast_mode=True)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(n=0, n_ineq=2), "n must be"), (dict(n=3, n_ineq=0), "n_ineq"), (dict(n=3, n_ineq=2, n_eq=3), "n_eq"),
     (dict(n=3, n_ineq=2, eps=0.0), "eps")],
)
def test_optnet_layer_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OptNetLayer(**kwargs)


def test_optnet_layer_bad_input_shape():
    with pytest.raises(ValueError, match=r"shape \(batch, 4\)"):
        OptNetLayer(4, 3)(torch.randn(2, 5))


def test_two_sided_layer_is_feasible_and_trains_its_lower_bounds():
    torch.manual_seed(0)
    layer = OptNetLayer(n=6, n_ineq=5, two_sided=True).double()
    with torch.no_grad():
        layer.s0_raw.fill_(-3.0)  # tight bounds on both sides: some rows active at each
        layer.s1_raw.fill_(-3.0)
    q = torch.randn(16, 6, dtype=torch.float64) * 3
    z = layer(q)
    Gz, h, lower = z @ layer.G.T, layer.qp_parameters()[2], layer.lower_bounds()
    assert (Gz <= h + 1e-9).all() and (Gz >= lower - 1e-9).all()
    lam = layer.solves.last["qp"].lam
    assert (lam > 0).any() and (lam < 0).any()
    z.square().sum().backward()
    assert layer.s1_raw.grad.abs().sum() > 0 and torch.isfinite(layer.s1_raw.grad).all()
