"""LightningModules of the OptNet experiments (Amos & Kolter 2017) and their baselines.

- `OptNetClassifier`: FC -> ReLU -> FC -> OptNet layer -> FC -> log-softmax (the paper's
  FC600-FC10-OptNet10 classifier scaled to the data); `MLPClassifier` is the same network with the
  OptNet layer replaced by FC + ReLU of the same width.
- `OptNetSudoku`: the paper's 4x4 Sudoku model. One QP over the 64 one-hot cell variables,
  `min eps/2 |z|^2 - puzzle^T z  s.t.  z >= 0, A z = b`, where only the equality constraints
  `A` (and the feasible point `z0` that defines `b = A z0`) are learned from (puzzle, solution)
  pairs; trained, as in the paper, with the squared error between z and the one-hot solution.
  `ConvSudoku` is a convolutional baseline trained with per-cell cross-entropy.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ift import hparams
from ift.implicit.diagnostics import SolveRecorder
from ift.optnet.layer import OptNetLayer
from ift.optnet.qp import PRECISIONS, solve_qp_with_info

SUDOKU_SHAPE = (4, 4, 4)  # (digit, row, col), as ift.data.SudokuDataModule yields


def check_precision(precision) -> str:
    return hparams.require(precision in PRECISIONS, "precision",
                           f"one of {', '.join(PRECISIONS)} (the QP's dtype policy, docs/optnet.md)", precision)


def check_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    ok = not isinstance(input_shape, (str, bytes)) and len(input_shape) == 3 and all(int(s) >= 1 for s in input_shape)
    hparams.require(ok, "input_shape", "three positive ints [C, H, W]", input_shape)
    return tuple(int(s) for s in input_shape)  # type: ignore[return-value]


class _SupervisedModule(L.LightningModule):
    """Shared steps: subclasses implement `compute(batch) -> (loss, metrics)`, where metrics holds
    per-batch means (at least "acc") and, optionally, per-batch sums under keys ending in "_errors".
    QP modules record their solves in a `SolveRecorder` (`solves`); `SolverDiagnostics` logs them."""

    def compute(self, batch) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def training_step(self, batch, batch_idx):
        loss, metrics = self.compute(batch)
        size = len(batch[0])
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/acc", metrics["acc"], batch_size=size)
        return loss

    def _eval_step(self, batch, stage: str) -> None:
        loss, metrics = self.compute(batch)
        size = len(batch[0])
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", batch_size=size, sync_dist=True)
        for key, value in metrics.items():
            reduce = "sum" if key.endswith("_errors") else "mean"
            self.log(f"{stage}/{key}", value.float(), batch_size=size, reduce_fx=reduce, sync_dist=True)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


# ------------------------------------------------------------------------------------ classifiers


class _Classifier(_SupervisedModule):
    """FC(hidden) -> ReLU -> FC(width) -> middle -> FC(num_classes) -> log-softmax."""

    def _build(self, input_shape, num_classes, hidden, width, lr, weight_decay, middle: nn.Module) -> None:
        in_features = 1
        for s in check_shape(input_shape):
            in_features *= s
        hparams.integer("num_classes", num_classes, 2)
        hparams.integer("hidden", hidden, 1)
        hparams.integer("width", width, 1)
        hparams.positive("lr", lr)
        hparams.positive("weight_decay", weight_decay, allow_zero=True)
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, width))
        self.middle = middle
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return F.log_softmax(self.head(self.middle(self.encoder(x))), dim=-1)

    def compute(self, batch):
        x, y = batch
        log_probs = self(x)
        return F.nll_loss(log_probs, y), {"acc": (log_probs.argmax(-1) == y).float().mean()}


class OptNetClassifier(_Classifier):
    """The middle layer is `OptNetLayer(width, n_ineq, n_eq)`: the FC output is its linear term q.

    Args:
        input_shape, num_classes: from the data (`${data.shape}`, `${data.num_classes}`).
        hidden: width of the first FC layer (600 in the paper on MNIST).
        width: number of QP variables n (10 in the paper), also the FC widths around it.
        n_ineq, n_eq: inequality and equality constraints of the QP.
        eps: Q = L L^T + eps I.  max_iter: interior point iterations per solve.
        precision: the QP solver's dtype policy, "mixed" | "float64" | "input" (docs/optnet.md).
        lr, weight_decay: Adam.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: int = 64, width: int = 10,
                 n_ineq: int = 20, n_eq: int = 0, eps: float = 1e-4, max_iter: int = 50, lr: float = 1e-3,
                 weight_decay: float = 0.0, precision: str = "mixed"):
        super().__init__()
        self.save_hyperparameters()
        hparams.integer("n_ineq", n_ineq, 1)
        hparams.integer("n_eq", n_eq, 0)
        hparams.require(n_eq < width, "n_eq", f"< model.width={width} (the QP needs free directions)", n_eq)
        hparams.positive("eps", eps)
        hparams.integer("max_iter", max_iter, 1)
        check_precision(precision)
        self._build(input_shape, num_classes, hidden, width, lr, weight_decay,
                    OptNetLayer(width, n_ineq, n_eq, eps=eps, max_iter=max_iter, precision=precision))


class MLPClassifier(_Classifier):
    """`OptNetClassifier` with the OptNet layer replaced by FC(width, width) + ReLU."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: int = 64, width: int = 10,
                 lr: float = 1e-3, weight_decay: float = 0.0):
        super().__init__()
        self.save_hyperparameters()
        hparams.integer("width", width, 1)
        self._build(input_shape, num_classes, hidden, width, lr, weight_decay,
                    nn.Sequential(nn.Linear(width, width), nn.ReLU()))


# ------------------------------------------------------------------------------------ sudoku


def check_sudoku_data(input_shape: Sequence[int], num_classes: int) -> None:
    ok = check_shape(input_shape) == SUDOKU_SHAPE and num_classes == 4
    hparams.require(ok, "input_shape", "[4, 4, 4] with model.num_classes 4 (Sudoku models need data=sudoku)",
                    f"{list(input_shape)} with model.num_classes {num_classes!r}")


def board_metrics(pred: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Cell accuracy, puzzle accuracy and the number of puzzles with any wrong cell (pred, y: (B, 4, 4))."""
    solved = (pred == y).flatten(1).all(1)
    return {"acc": (pred == y).float().mean(), "puzzle_acc": solved.float().mean(),
            "puzzle_errors": (~solved).sum()}


class OptNetSudoku(_SupervisedModule):
    """z*(puzzle) = argmin eps/2 |z|^2 - puzzle^T z  s.t.  z >= 0,  A z = A z0, over z in R^64
    (the one-hot board, flattened as (digit, row, col)); the prediction is the argmax digit per cell.

    The learned parameters are A (n_eq x 64) and z0 = softplus(z0_raw) > 0, which keeps the QP
    strictly feasible for every A. z0 starts at 1/4 in every entry, the board that satisfies all
    Sudoku constraints in expectation.

    Args:
        input_shape, num_classes: must be the Sudoku data's [4, 4, 4] and 4.
        n_eq: learned equality constraints (40 in the paper). eps: Q = eps I (0.1 in the paper).
        max_iter: interior point iterations.  lr, weight_decay: Adam.
        precision: the QP solver's dtype policy, "mixed" | "float64" | "input" (docs/optnet.md).
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, n_eq: int = 40, eps: float = 0.1,
                 max_iter: int = 50, lr: float = 0.1, weight_decay: float = 0.0, precision: str = "mixed"):
        super().__init__()
        self.save_hyperparameters()
        check_sudoku_data(input_shape, num_classes)
        n = 64
        hparams.integer("n_eq", n_eq, 1)
        hparams.require(n_eq < n, "n_eq", "< 64 (the number of QP variables)", n_eq)
        hparams.positive("eps", eps)
        hparams.integer("max_iter", max_iter, 1)
        check_precision(precision)
        hparams.positive("lr", lr)
        hparams.positive("weight_decay", weight_decay, allow_zero=True)
        self.n, self.eps, self.max_iter, self.precision = n, float(eps), max_iter, precision
        self.A = nn.Parameter(torch.randn(n_eq, n) / n**0.5)
        inverse_softplus_quarter = torch.log(torch.expm1(torch.tensor(0.25)))
        self.z0_raw = nn.Parameter(torch.full((n,), float(inverse_softplus_quarter)))
        self.solves = SolveRecorder()

    def forward(self, x: Tensor) -> Tensor:
        """Puzzle one-hot (B, 4, 4, 4) -> QP solution z (B, 4, 4, 4), same layout."""
        if x.shape[1:] != SUDOKU_SHAPE:
            raise ValueError(f"OptNetSudoku: input must have shape (B, 4, 4, 4), got {tuple(x.shape)}")
        q = -x.flatten(1)
        eye = torch.eye(self.n, dtype=q.dtype, device=q.device)
        zeros = torch.zeros(self.n, dtype=q.dtype, device=q.device)
        b = self.A @ F.softplus(self.z0_raw)
        sol = solve_qp_with_info(self.eps * eye, q, -eye, zeros, self.A, b, strict=True, max_iter=self.max_iter,
                                 precision=self.precision)
        self.solves.record(sol, "qp")
        return sol.z.view_as(x)

    def compute(self, batch):
        x, y = batch
        z = self(x)
        target = F.one_hot(y, 4).permute(0, 3, 1, 2).to(z.dtype)
        return F.mse_loss(z, target), board_metrics(z.argmax(1), y)


class ConvSudoku(_SupervisedModule):
    """Baseline: `depth` 3x3 conv layers of `channels` with ReLU, then a 1x1 conv to 4 digit logits
    per cell, trained with cross-entropy (the paper's baseline is a deeper conv net on 4x4 too)."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: int = 64, depth: int = 4,
                 lr: float = 1e-3, weight_decay: float = 0.0):
        super().__init__()
        self.save_hyperparameters()
        check_sudoku_data(input_shape, num_classes)
        hparams.integer("channels", channels, 1)
        hparams.integer("depth", depth, 1)
        hparams.positive("lr", lr)
        hparams.positive("weight_decay", weight_decay, allow_zero=True)
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Conv2d(4 if i == 0 else channels, channels, 3, padding=1), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Conv2d(channels, 4, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (B, 4 digit logits, 4, 4)

    def compute(self, batch):
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits, y), board_metrics(logits.argmax(1), y)
