"""The core's proximal term and proximal objective, against closed forms."""

import pytest
import torch

from ift.implicit import proximal_objective, proximal_penalty


def test_proximal_penalty_closed_form_and_no_term():
    x, anchor = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert torch.allclose(proximal_penalty(x, anchor, 0.5), torch.tensor([5.0, 25.0]))
    assert torch.equal(proximal_penalty(x, anchor, None), torch.zeros(2))
    assert torch.equal(proximal_penalty(x, anchor, float("inf")), torch.zeros(2))
    with pytest.raises(ValueError, match="eta must be > 0"):
        proximal_penalty(x, anchor, 0.0)


def test_proximal_objective_adds_the_penalty_and_is_f_itself_without_a_term():
    f = lambda x: x.pow(3).sum(-1)  # noqa: E731
    x, anchor = torch.tensor([[1.0, 2.0], [0.0, -1.0]]), torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert torch.equal(proximal_objective(f, anchor, 0.5)(x), f(x) + torch.tensor([5.0, 34.0]))
    assert proximal_objective(f, anchor, None) is f and proximal_objective(f, anchor, float("inf")) is f
