"""The 4x4 Sudoku generator: valid boards, puzzles consistent with (and uniquely solved by) their
solutions, seeded determinism, the config, bad arguments."""

import itertools
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ift.data import SudokuDataModule
from ift.data.sudoku import all_boards, generate_puzzles, is_valid_board

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "data" / "sudoku.yaml"


def brute_force_valid(board) -> bool:
    """Independent check by sets: rows, columns and 2x2 boxes each hold {0, 1, 2, 3}."""
    b = [[int(v) for v in row] for row in board]
    groups = [b[r] for r in range(4)] + [[b[r][c] for r in range(4)] for c in range(4)]
    groups += [[b[r][c] for r in range(br, br + 2) for c in range(bc, bc + 2)] for br in (0, 2) for bc in (0, 2)]
    return all(set(g) == {0, 1, 2, 3} for g in groups)


def brute_force_solutions(puzzle_digits, mask) -> int:
    """Count completions by backtracking over the blanks, each tried with every digit that does
    not repeat in its row, column or box (a reference for uniqueness)."""
    board = [[int(puzzle_digits[r][c]) if mask[r][c] else None for c in range(4)] for r in range(4)]

    def allowed(r, c, v):
        box = [board[i][j] for i in range(r - r % 2, r - r % 2 + 2) for j in range(c - c % 2, c - c % 2 + 2)]
        return v not in board[r] and v not in [board[i][c] for i in range(4)] and v not in box

    def count() -> int:
        for r, c in itertools.product(range(4), range(4)):
            if board[r][c] is None:
                total = 0
                for v in range(4):
                    if allowed(r, c, v):
                        board[r][c] = v
                        total += count()
                        board[r][c] = None
                return total
        return int(brute_force_valid(board))

    return count()


def small(**kwargs) -> SudokuDataModule:
    defaults = {"n_train": 200, "n_test": 50, "batch_size": 32}
    return SudokuDataModule(**{**defaults, **kwargs})


def test_all_288_boards_are_distinct_and_valid():
    boards = all_boards()
    assert boards.shape == (288, 4, 4)  # the known number of 4x4 Sudoku grids
    assert len({tuple(b.flatten().tolist()) for b in boards}) == 288
    assert all(brute_force_valid(b) for b in boards)
    assert is_valid_board(boards).all()


def test_is_valid_board_rejects_broken_boards():
    board = all_boards()[0].clone()
    swapped = board.clone()
    swapped[0, 0], swapped[0, 1] = board[0, 1], board[0, 0]  # rows stay valid, columns break
    assert brute_force_valid(board) and not brute_force_valid(swapped)
    assert is_valid_board(board) and not is_valid_board(swapped)


def test_puzzles_are_consistent_with_their_unique_solutions():
    dm = small(n_blanks=8)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 4, 4, 4) and x.dtype == torch.float32
    assert y.shape == (32, 4, 4) and y.dtype == torch.int64
    clue = x.sum(1) == 1
    assert ((x == 0) | (x == 1)).all() and (x.sum(1) <= 1).all()  # one-hot or blank
    assert (clue.flatten(1).sum(1) == 16 - 8).all()
    assert (x.argmax(1)[clue] == y[clue]).all()  # clues agree with the solution
    for i in range(32):
        assert brute_force_valid(y[i])
        assert brute_force_solutions(x[i].argmax(0), clue[i]) == 1


def test_seeded_and_split():
    a, b, c = small(seed=3), small(seed=3), small(seed=4)
    for dm in (a, b, c):
        dm.setup()
    assert len(a.train_set) == 180 and len(a.val_set) == 20 and len(a.test_set) == 50
    assert torch.equal(a.train_set.images, b.train_set.images) and torch.equal(a.test_set.labels, b.test_set.labels)
    assert not torch.equal(a.test_set.labels, c.test_set.labels)


def test_blanks_stop_where_uniqueness_would_break():
    mask, solutions = generate_puzzles(200, 12, torch.Generator().manual_seed(0))
    blanks = (~mask).flatten(1).sum(1)
    assert (blanks <= 12).all() and (blanks >= 8).all()
    for i in range(50):  # uniqueness against brute force at the most blanks
        assert brute_force_solutions(solutions[i], mask[i]) == 1


def test_config_matches_module():
    cfg = OmegaConf.load(CONFIG)
    cfg.n_train, cfg.n_test = 100, 10
    dm = instantiate(cfg)
    assert dm.shape == tuple(cfg.shape) == (4, 4, 4) and dm.num_classes == cfg.num_classes == 4


@pytest.mark.parametrize("kwargs,key", [({"n_blanks": 13}, "n_blanks"), ({"n_blanks": 0}, "n_blanks"),
                                        ({"n_train": 1}, "n_train"), ({"shape": [1, 8, 8]}, "data.shape")])
def test_bad_arguments(kwargs, key):
    with pytest.raises(ValueError, match=key):
        small(**kwargs)
