from types import SimpleNamespace

import torch

from ift.training import PerRankSeed


def test_per_rank_seed_gives_each_rank_its_own_stream_and_is_reproducible():
    def draw(rank: int) -> torch.Tensor:
        PerRankSeed(seed=5).setup(SimpleNamespace(global_rank=rank), None, "fit")
        return torch.rand(4)

    assert not torch.equal(draw(0), draw(1))
    assert torch.equal(draw(1), draw(1))
