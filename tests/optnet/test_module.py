"""OptNet LightningModules: each trains a few steps, the Sudoku QP with the true constraints solves
puzzles exactly, logged puzzle counts equal a manual count, seeded determinism, bad arguments."""

import lightning as L
import pytest
import torch

from ift.data import DigitsDataModule, SudokuDataModule
from ift.optnet.module import ConvSudoku, MLPClassifier, OptNetClassifier, OptNetSudoku, board_metrics
from ift.telemetry import SolverDiagnostics


def trainer(**kwargs) -> L.Trainer:
    return L.Trainer(**{"fast_dev_run": True, "accelerator": "cpu", "logger": False,
                        "enable_checkpointing": False, "enable_progress_bar": False,
                        "enable_model_summary": False, **kwargs})


def sudoku_data(**kwargs) -> SudokuDataModule:
    return SudokuDataModule(**{"n_train": 100, "n_test": 40, "batch_size": 20, **kwargs})


def sudoku_constraints() -> torch.Tensor:
    """The true 4x4 Sudoku constraints on z[d, r, c] (flattened): each cell holds one digit and each
    digit appears once per row, column and box; 64 rows of rank 40 (the paper's n_eq = 40)."""
    index = torch.arange(64).view(4, 4, 4)  # (digit, row, col)
    groups = [index[:, r, c] for r in range(4) for c in range(4)]
    for d in range(4):
        groups += [index[d, r, :] for r in range(4)] + [index[d, :, c] for c in range(4)]
        groups += [index[d, br:br + 2, bc:bc + 2].flatten() for br in (0, 2) for bc in (0, 2)]
    A = torch.zeros(len(groups), 64)
    for row, cols in enumerate(groups):
        A[row, cols] = 1.0
    return A


def params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


@pytest.mark.parametrize("cls,data", [(OptNetClassifier, "digits"), (MLPClassifier, "digits"),
                                      (OptNetSudoku, "sudoku"), (ConvSudoku, "sudoku")])
def test_each_model_trains_a_few_steps(cls, data):
    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=32) if data == "digits" else sudoku_data()
    model = cls(input_shape=list(dm.shape), num_classes=dm.num_classes)
    before = params(model)
    t = trainer(fast_dev_run=3, callbacks=[SolverDiagnostics()])
    t.fit(model, datamodule=dm)
    assert not torch.equal(before, params(model))
    metrics = t.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and torch.isfinite(metrics["val/loss"])
    assert 0 <= float(metrics["val/acc"]) <= 1
    if cls in (OptNetClassifier, OptNetSudoku):
        assert float(metrics["qp/solver_iters"]) >= 1 and float(metrics["val/solver_iters"]) >= 1
        assert float(metrics["qp/nonconverged_frac"]) == 0.0


def test_same_widths_in_optnet_and_mlp_classifiers():
    a, b = OptNetClassifier([1, 8, 8], 10, hidden=32, width=12), MLPClassifier([1, 8, 8], 10, hidden=32, width=12)
    assert [p.shape for p in a.encoder.parameters()] == [p.shape for p in b.encoder.parameters()]
    assert a.head.weight.shape == b.head.weight.shape == (10, 12)
    assert a.middle.n == 12 and b.middle[0].weight.shape == (12, 12)
    x = torch.rand(5, 1, 8, 8)
    assert torch.allclose(a(x).exp().sum(-1), torch.ones(5), atol=1e-5)  # log-probabilities


def test_sudoku_qp_with_the_true_constraints_solves_every_puzzle():
    """The model class contains an exact solver: with A = the Sudoku constraints and z0 = 1/4 the QP
    output's argmax is the unique solution of every puzzle, and z is a feasible (near one-hot) board."""
    dm = sudoku_data(n_blanks=12)
    dm.setup()
    x, y = dm.test_set.float_images(), dm.test_set.labels
    model = OptNetSudoku([4, 4, 4], 4)
    model.A = torch.nn.Parameter(sudoku_constraints())
    with torch.no_grad():
        z = model(x)
    assert (z.argmax(1) == y).all()
    assert torch.allclose(z.sum(1), torch.ones(len(x), 4, 4), atol=1e-5)  # one digit per cell
    assert (z >= -1e-6).all()
    assert bool(model.solves.last["qp"].converged.all())


def test_board_metrics_count_wrong_puzzles():
    y = torch.zeros(3, 4, 4, dtype=torch.int64)
    pred = y.clone()
    pred[1, 2, 3] = 1  # one wrong cell in puzzle 1
    pred[2] = 3  # puzzle 2 all wrong
    m = board_metrics(pred, y)
    assert int(m["puzzle_errors"]) == 2
    assert float(m["puzzle_acc"]) == pytest.approx(1 / 3)
    assert float(m["acc"]) == pytest.approx((16 + 15) / 48)


def test_logged_test_puzzle_errors_are_a_sum_over_batches():
    torch.manual_seed(0)
    dm = sudoku_data(n_test=50, batch_size=20)  # batches of 20, 20, 10
    model = ConvSudoku([4, 4, 4], 4)
    result = trainer(fast_dev_run=False, max_epochs=1, limit_train_batches=2).test(model, datamodule=dm, verbose=False)[0]
    dm.setup()
    with torch.no_grad():
        pred = model(dm.test_set.float_images()).argmax(1)
    wrong = int((pred != dm.test_set.labels).flatten(1).any(1).sum())
    assert result["test/puzzle_errors"] == wrong
    assert result["test/puzzle_acc"] == pytest.approx(1 - wrong / 50)


def test_training_is_deterministic_under_a_seed():
    def run():
        L.seed_everything(7)
        model = OptNetSudoku([4, 4, 4], 4, n_eq=20)
        trainer(fast_dev_run=2).fit(model, datamodule=sudoku_data())
        return params(model)

    assert torch.equal(run(), run())


@pytest.mark.parametrize("cls", [OptNetSudoku, ConvSudoku])
def test_sudoku_models_reject_other_data(cls):
    with pytest.raises(ValueError, match="data=sudoku"):
        cls(input_shape=[1, 8, 8], num_classes=10)
    with pytest.raises(ValueError, match="shape"):
        OptNetSudoku([4, 4, 4], 4)(torch.zeros(2, 1, 8, 8))


@pytest.mark.parametrize("cls,kwargs,key", [
    (OptNetClassifier, {"width": 5, "n_eq": 5}, "n_eq"),
    (OptNetClassifier, {"n_ineq": 0}, "n_ineq"),
    (OptNetClassifier, {"eps": 0.0}, "eps"),
    (OptNetClassifier, {"input_shape": [8, 8]}, "input_shape"),
    (MLPClassifier, {"lr": 0}, "lr"),
    (MLPClassifier, {"hidden": 1.5}, "hidden"),
    (OptNetSudoku, {"n_eq": 64}, "n_eq"),
    (ConvSudoku, {"depth": 0}, "depth"),
    (OptNetClassifier, {"precision": "float16"}, "precision"),
    (OptNetSudoku, {"precision": "double"}, "precision"),
])
def test_bad_hyperparameters_name_the_key(cls, kwargs, key):
    sudoku = cls in (OptNetSudoku, ConvSudoku)
    args = {"input_shape": [4, 4, 4] if sudoku else [1, 8, 8], "num_classes": 4 if sudoku else 10, **kwargs}
    with pytest.raises(ValueError, match=key):
        cls(**args)


@pytest.mark.parametrize("precision", ["mixed", "float64"])
def test_precision_reaches_the_solver_and_policies_agree(precision, monkeypatch):
    """model.precision is passed to solve_qp_with_info; the policies give the same solution."""
    import ift.optnet.module as module

    seen = []
    solve = module.solve_qp_with_info
    monkeypatch.setattr(module, "solve_qp_with_info", lambda *a, **kw: seen.append(kw["precision"]) or solve(*a, **kw))
    torch.manual_seed(0)
    x = torch.zeros(3, 4, 4, 4, dtype=torch.float64)
    x[:, 0, 0, 0] = 1.0
    reference = OptNetSudoku([4, 4, 4], 4).double()
    model = OptNetSudoku([4, 4, 4], 4, precision=precision).double()
    model.load_state_dict(reference.state_dict())
    torch.testing.assert_close(model(x), reference(x), atol=1e-9, rtol=0)
    assert seen == [precision, "mixed"]
    layers = [m for m in OptNetClassifier([1, 8, 8], 10, precision=precision).modules() if hasattr(m, "solve_kwargs")]
    assert layers and all(m.solve_kwargs["precision"] == precision for m in layers)
