import torch

from ift.telemetry import SavedTensorCounter


def test_live_bytes_count_what_backward_holds_once_per_storage():
    x = torch.randn(1000, requires_grad=True)
    with SavedTensorCounter() as counter:
        y = x.exp()          # saves its result: 4000 bytes
        z = (y * y).sum()    # saves y twice: same storage, counted once
    assert counter.live_bytes == 4000
    z.backward()
    del y, z
    assert counter.live_bytes == 0          # the graph is gone
    assert counter.total_bytes == 4000


def test_graphs_freed_inside_the_block_do_not_count_as_live():
    w = torch.randn(50, 50, requires_grad=True)
    with SavedTensorCounter() as counter:
        for _ in range(5):  # an inner loop without create_graph: each graph is freed by grad()
            (g,) = torch.autograd.grad((w.tanh() ** 2).sum(), w)
    assert counter.live_bytes == 0
    assert counter.total_bytes > 0


def test_tensors_saved_inside_torch_func_jvp_are_counted():
    """Unrolled Newton builds its Hessian with nested torch.func.jvp under create_graph: tensors saved
    there have no readable data pointer (this raised RuntimeError before)."""
    x = torch.randn(1000, requires_grad=True)
    ones = torch.ones(1000)
    with SavedTensorCounter() as counter:
        (out, first), (_, second) = torch.func.jvp(
            lambda u: torch.func.jvp(torch.nn.functional.softplus, (u,), (ones,)), (x,), (ones,))
        loss = (out * first * second).sum()
    assert counter.live_bytes >= 3 * 4000  # at least softplus's input and the two products' operands
    (grad,) = torch.autograd.grad(loss, x)
    s = torch.sigmoid(x.detach())  # d/dx [softplus * sigmoid * sigmoid']
    sp, ds = torch.nn.functional.softplus(x.detach()), s * (1 - s)
    d2s = ds * (1 - 2 * s)
    torch.testing.assert_close(grad, s * s * ds + sp * ds * ds + sp * s * d2s)
