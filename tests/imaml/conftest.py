import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Meta-learning here is thousands of tiny ops: a second intra-op thread only adds overhead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
