"""One optimisation step under 2-process DDP (CPU, gloo) equals one step of a single process on the
concatenated batch, for every model family, in float64.

Why it holds: the DistributedSampler gives rank r the examples r, r + 2, ...; each rank's loss is
the mean over its B examples and DDP averages the gradients of the 2 ranks, so every rank steps with
the mean gradient over all 2B examples, which is the single process's gradient on the same batch.

What has to be made equal first is the training noise. Each rank draws from its own copy of the
global RNG, all copies in the same state, so the noise rank r draws for its i-th example is not
the noise the single process draws for that example (and both ranks draw the same numbers). Both
runs are valid Monte Carlo estimates, but not equal ones. So the SAVI test ties the noise to the
example (a fixed table indexed by the example id, carried as the label, which SAVI ignores), and
the PGD test turns PGD's random start off. What is left is floating-point summation order.
"""

from __future__ import annotations

import copy
from pathlib import Path
from unittest import mock

import lightning.pytorch as pl
import pytest
import torch
from hydra.utils import get_class
from omegaconf import OmegaConf
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import ift.config
from ift.saliency.module import ClassifierModule
from ift.savi.module import SAVIModule

WORLD = 2
PER_RANK = 4                 # examples per rank; the single process gets WORLD * PER_RANK
TOL = dict(atol=1e-10, rtol=1e-10)


# --- the pieces both runs share (module level so the spawned ranks can unpickle them) ---------
class FixedBatches(pl.LightningDataModule):
    """The same examples in a fixed order; Lightning swaps in a DistributedSampler under DDP."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=False)


class RecordStep(pl.Callback):
    """Saves this rank's gradients (after DDP's all-reduce) and its parameters after the step."""

    def __init__(self, out_dir: Path):
        self.out_dir = str(out_dir)
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}

    def on_train_end(self, trainer, pl_module):
        params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        torch.save({"grads": self.grads, "params": params, "world_size": trainer.world_size},
                   Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


class FixedNoiseSAVI(SAVIModule):
    """SAVIModule whose training noise is a fixed function of the example: the label carries the
    example id, and each call of `vae.sample_eps` (inner noise first, then the outer ELBO's) reads
    that example's column of a fixed table instead of drawing from the global RNG."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        gen = torch.Generator().manual_seed(0)
        n, d = WORLD * PER_RANK, self.hparams.latent_dim
        self.noise_tables = [torch.randn(self.hparams.inner_samples, n, d, generator=gen, dtype=torch.float64),
                             torch.randn(self.hparams.train_samples, n, d, generator=gen, dtype=torch.float64)]

    def training_step(self, batch, batch_idx):
        ids = batch[1]
        tables = iter(self.noise_tables)

        def sample_eps(batch_size, n_samples=1, generator=None, like=None):
            table = next(tables)
            assert table.shape[0] == n_samples and len(ids) == batch_size
            return table[:, ids].to(like)

        with mock.patch.object(self.vae, "sample_eps", sample_eps):
            loss = super().training_step(batch, batch_idx)
        assert next(tables, None) is None, "training_step drew noise a different number of times than expected"
        return loss


# --- helpers ----------------------------------------------------------------------------------
def model_config(name: str, tmp_path: Path) -> dict:
    """configs/model/<name>.yaml composed with data=digits, resolved to plain kwargs (without `runs_on`)."""
    assert (ift.config.CONFIG_DIR / "model" / f"{name}.yaml").exists(), f"configs/model/{name}.yaml is missing"
    cfg = ift.config.compose_config("train", [f"model={name}", "data=digits"], tmp_path / "compose")
    return OmegaConf.to_container(ift.config.module_config(cfg.model), resolve=True)


def digits_batch(labels: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The first WORLD * PER_RANK digits in float64 [0, 1]; labels = the classes or the example ids."""
    n = WORLD * PER_RANK
    digits = load_digits()
    x = torch.as_tensor(digits.images[:n], dtype=torch.float64).unsqueeze(1) / 16.0
    y = torch.as_tensor(digits.target[:n]) if labels == "classes" else torch.arange(n)
    return x, y.long()


def one_step(module: pl.LightningModule, x, y, out_dir: Path, devices: int) -> dict:
    out_dir.mkdir(parents=True)
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
        max_steps=1, precision="64-true", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, use_distributed_sampler=True, callbacks=[RecordStep(out_dir)],
        default_root_dir=out_dir,
    )
    trainer.fit(module, datamodule=FixedBatches(x, y, batch_size=len(x) // devices))
    return {rank: torch.load(out_dir / f"rank{rank}.pt", weights_only=True) for rank in range(devices)}


def assert_all_close(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL, msg=lambda m: f"{what} {name}: {m}")


def check_ddp_equals_single(module: pl.LightningModule, x, y, tmp_path: Path) -> None:
    module = module.double()
    initial = {n: p.detach().clone() for n, p in module.named_parameters()}
    single = one_step(copy.deepcopy(module), x, y, tmp_path / "single", devices=1)[0]
    ddp = one_step(module, x, y, tmp_path / "ddp", devices=WORLD)

    assert [ddp[r]["world_size"] for r in range(WORLD)] == [WORLD] * WORLD
    # The step did something: a nonzero gradient on every parameter, and the weights moved.
    for name, g in single["grads"].items():
        assert g.abs().max() > 0, f"zero gradient for {name}: the comparison would be vacuous"
    assert single["grads"].keys() == initial.keys(), "some parameters got no gradient"
    moved = max((single["params"][n] - initial[n]).abs().max().item() for n in initial)
    assert moved > 1e-6
    for rank in range(WORLD):
        assert_all_close(ddp[rank]["grads"], single["grads"], f"rank {rank} gradient vs single process:")
        assert_all_close(ddp[rank]["params"], single["params"], f"rank {rank} weights vs single process:")
    # ddp_spawn copies rank 0's weights back into the module of the main process.
    for name, p in module.named_parameters():
        assert torch.equal(p.detach(), ddp[0]["params"][name]), f"{name} not copied back from rank 0"


# --- one test per model family -----------------------------------------------------------------
def test_vae_ddp_step_equals_single_process(tmp_path):
    kwargs = model_config("vae", tmp_path)
    kwargs.pop("_target_")
    module = FixedNoiseSAVI(**kwargs)
    check_ddp_equals_single(module, *digits_batch("ids"), tmp_path)


@pytest.mark.slow
def test_savi_ift_ddp_step_equals_single_process(tmp_path):
    kwargs = model_config("savi_ift", tmp_path)
    kwargs.pop("_target_")
    module = FixedNoiseSAVI(**kwargs)
    check_ddp_equals_single(module, *digits_batch("ids"), tmp_path)


@pytest.mark.slow
def test_classifier_pgd_ddp_step_equals_single_process(tmp_path):
    kwargs = model_config("classifier_pgd", tmp_path)
    kwargs.pop("_target_")
    assert kwargs["pgd"], "classifier_pgd.yaml should train on PGD examples"
    kwargs["random_start"] = False  # PGD from x itself: no random draw to differ between ranks
    module = ClassifierModule(**kwargs)
    check_ddp_equals_single(module, *digits_batch("classes"), tmp_path)


@pytest.mark.slow
def test_optnet_classifier_ddp_step_equals_single_process(tmp_path):
    kwargs = model_config("optnet_classifier", tmp_path)
    module = get_class(kwargs.pop("_target_"))(**kwargs)
    # At the default init (slacks softplus(0) = 0.69) no inequality is active on these digits, so
    # the exact active-set backward gives G exactly zero gradient and the comparison would be
    # vacuous for G: small slacks make constraints bind.
    with torch.no_grad():
        for layer in module.modules():
            if hasattr(layer, "s0_raw"):
                layer.s0_raw.fill_(-4.0)
    check_ddp_equals_single(module, *digits_batch("classes"), tmp_path)
