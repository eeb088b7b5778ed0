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
