import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ift.telemetry import NonFiniteGuard, NonFiniteStepError


class PoisonedModel(pl.LightningModule):
    """Linear regression whose loss is NaN on the batches listed in `poison`."""

    def __init__(self, poison: set[int]):
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)
        self.poison = poison
        self.snapshots: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = (self.lin(x) - y).pow(2).mean()
        if batch_idx in self.poison:
            loss = loss * torch.tensor(float("nan"))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.snapshots.append(self.lin.weight.detach().clone())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.1)


def fit(model, guard):
    data = DataLoader(TensorDataset(torch.randn(8, 3), torch.randn(8, 1)), batch_size=2)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[guard])
    trainer.fit(model, data)
    return trainer


def test_skip_policy_leaves_weights_untouched_on_a_nan_step_and_counts_it():
    torch.manual_seed(0)
    model = PoisonedModel(poison={1})
    guard = NonFiniteGuard("skip")
    fit(model, guard)
    assert guard.skipped == 1
    torch.testing.assert_close(model.snapshots[1], model.snapshots[0])  # step 1 skipped
    assert not torch.equal(model.snapshots[2], model.snapshots[1])       # training went on
    assert all(torch.isfinite(s).all() for s in model.snapshots)


def test_stop_policy_names_the_step_and_parameter():
    with pytest.raises(NonFiniteStepError, match=r"global step 2 in parameter `lin.weight`"):
        fit(PoisonedModel(poison={2}), NonFiniteGuard("stop"))


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="policy='ignore' is unknown"):
        NonFiniteGuard("ignore")
