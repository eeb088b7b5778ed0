"""The generated sinusoid tasks: shapes, the task law, determinism, splits, bad settings."""

import math

import pytest
import torch

from ift.data.sinusoid import SinusoidDataModule


def test_items_and_batches_have_task_shapes():
    dm = SinusoidDataModule(shots=5, query=7, batch_size=4, train_tasks=12)
    xs, ys, xq, yq = next(iter(dm.train_dataloader()))
    assert xs.shape == ys.shape == (4, 5, 1) and xq.shape == yq.shape == (4, 7, 1)
    assert xs.dtype == torch.float32
    assert len(dm.train_dataloader()) == 3


def test_points_follow_each_tasks_sinusoid_and_ranges():
    dm = SinusoidDataModule(amplitude=[0.5, 2.0], phase=[0.0, 1.0], x_range=[-3.0, 3.0])
    tasks = dm.tasks("val")
    amps = []
    for i in range(len(tasks)):
        amp, phase = tasks.task(i)
        xs, ys, xq, yq = tasks[i]
        x, y = torch.cat([xs, xq]), torch.cat([ys, yq])
        torch.testing.assert_close(y, amp * torch.sin(x - phase), rtol=1e-5, atol=1e-5)
        assert 0.5 <= amp <= 2.0 and 0.0 <= phase <= 1.0 and bool(((x >= -3) & (x <= 3)).all())
        amps.append(amp)
    assert max(amps) - min(amps) > 1.0  # tasks really differ


def test_splits_are_fixed_and_distinct():
    a, b = SinusoidDataModule(seed=3), SinusoidDataModule(seed=3)
    for split in ("train", "val", "test"):
        for i in (0, 7):
            for t, u in zip(a.tasks(split)[i], b.tasks(split)[i]):
                assert torch.equal(t, u)
    params = {split: a.tasks(split).task(0) for split in ("train", "val", "test")}
    assert len(set(params.values())) == 3
    assert SinusoidDataModule(seed=4).tasks("test").task(0) != params["test"]


@pytest.mark.parametrize(
    "kwargs,key",
    [
        (dict(shots=0), "data.shots"),
        (dict(query=1.5), "data.query"),
        (dict(batch_size=0), "data.batch_size"),
        (dict(amplitude=[2.0, 1.0]), "data.amplitude"),
        (dict(amplitude=[-1.0, 1.0]), "data.amplitude"),
        (dict(x_range=[0.0]), "data.x_range"),
        (dict(phase=[0.0, math.inf]), "data.phase"),
        (dict(train_tasks=10**6), "at most"),
    ],
)
def test_bad_settings_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        SinusoidDataModule(**kwargs).tasks("train")
