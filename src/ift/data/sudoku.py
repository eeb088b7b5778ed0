"""4x4 Sudoku puzzles generated from a seed (the OptNet paper's Sudoku experiment).

A 4x4 board holds the digits 0..3 once in every row, column and 2x2 box. There are 288 such
boards; they are enumerated once and sampled uniformly (permuting a single base board by
digit/row/column/band/stack relabelling and transposition reaches only 96 of them, one of the
two equivalence classes). Cells are then blanked one at a time in random order, skipping any
blank that would give the puzzle a second solution, until `n_blanks` cells are blank, so every
puzzle has exactly one solution and "wrongly solved" is unambiguous.

Batches are (x, y): x the puzzle one-hot (B, 4, 4, 4) float32 with channel = digit and all-zero
channels at blank cells, y the solution (B, 4, 4) int64 digits.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import Tensor

from ift.data.base import ImageTensorDataset, LoadedData, SplitDataModule

SIZE = 4  # board side; boxes are 2x2


@lru_cache(maxsize=1)
def all_boards() -> Tensor:
    """All 288 valid 4x4 boards (288, 4, 4) int64, by backtracking over row permutations."""
    perms = list(itertools.permutations(range(SIZE)))
    boards: list[list[tuple[int, ...]]] = []

    def extend(rows: list[tuple[int, ...]]) -> None:
        if len(rows) == SIZE:
            boards.append(list(rows))
            return
        for row in perms:
            if any(row[c] == prev[c] for prev in rows for c in range(SIZE)):
                continue  # column clash
            if len(rows) % 2 == 1 and any(set(row[s:s + 2]) & set(rows[-1][s:s + 2]) for s in (0, 2)):
                continue  # clash inside a 2x2 box with the row above
            extend(rows + [row])

    extend([])
    return torch.tensor(boards, dtype=torch.int64)


def is_valid_board(board: Tensor) -> Tensor:
    """(..., 4, 4) digits -> (...,) bool: every row, column and 2x2 box holds 0..3 once."""
    onehot = torch.nn.functional.one_hot(board.long().clamp(0, SIZE - 1), SIZE)  # (..., r, c, d)
    in_range = ((board >= 0) & (board < SIZE)).flatten(-2).all(-1)
    rows = (onehot.sum(-2) == 1).flatten(-2).all(-1)  # each digit once per row
    cols = (onehot.sum(-3) == 1).flatten(-2).all(-1)
    boxes = onehot.unflatten(-3, (2, 2)).unflatten(-2, (2, 2))  # (..., br, r, bc, c, d)
    box_ok = (boxes.sum((-4, -2)) == 1).flatten(-3).all(-1)
    return in_range & rows & cols & box_ok


def count_solutions(puzzle: Tensor, clue_mask: Tensor) -> Tensor:
    """Number of valid boards agreeing with `puzzle` on the clue cells; (N, 4, 4) -> (N,)."""
    boards = all_boards().flatten(1)  # (288, 16)
    agree = (boards[None] == puzzle.flatten(1)[:, None]) | ~clue_mask.flatten(1)[:, None]
    return agree.all(-1).sum(-1)


def generate_puzzles(n: int, n_blanks: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """`n` puzzles with unique solutions: (clue_mask (n, 4, 4) bool, solution (n, 4, 4) int64)."""
    boards = all_boards().flatten(1)  # (288, 16)
    index = torch.randint(len(boards), (n,), generator=generator)
    differs = boards[index][:, :, None] != boards.T[None]  # (n, 16, 288): cells where each board differs
    # clue cells on which each board differs from the solution; a board fits the puzzle at 0
    clue_differences = differs.sum(1, dtype=torch.int16)
    mask = torch.ones(n, SIZE * SIZE, dtype=torch.bool)
    order = torch.argsort(torch.rand(n, SIZE * SIZE, generator=generator), dim=1)
    rows = torch.arange(n)
    for step in range(SIZE * SIZE):
        cell = order[:, step]
        trial = clue_differences - differs[rows, cell].to(torch.int16)
        unique = (trial == 0).sum(-1) == 1  # only the solution itself fits
        accept = ((~mask).sum(1) < n_blanks) & unique
        mask[rows[accept], cell[accept]] = False
        clue_differences[accept] = trial[accept]
    return mask.view(n, SIZE, SIZE), boards[index].view(n, SIZE, SIZE)


def puzzle_onehot(solutions: Tensor, clue_mask: Tensor) -> Tensor:
    """(N, 4, 4) digits and clue mask -> (N, 4, 4, 4) one-hot puzzle, channel = digit, zero at blanks."""
    onehot = torch.nn.functional.one_hot(solutions, SIZE).permute(0, 3, 1, 2)
    return onehot * clue_mask[:, None]


class SudokuDataModule(SplitDataModule):
    """Seeded 4x4 Sudoku puzzles: `n_train` puzzles (of which `val_fraction` validate) and
    `n_test` test puzzles, generated in `setup` from `seed` (test puzzles come after the training
    ones in the same random stream; with 288 boards an identical puzzle can occur in both).

    Args:
        n_train, n_test: numbers of puzzles (the OptNet paper: 9000 / 1000).
        n_blanks: blank cells per puzzle, 1..12; fewer are blanked when no further blank keeps
            the solution unique (a 4x4 puzzle needs at least 4 clues).
        other args: as `SplitDataModule`.
    """

    shape = (SIZE, SIZE, SIZE)
    num_classes = SIZE
    config_name = "sudoku"

    def __init__(
        self,
        n_train: int = 9000,
        n_test: int = 1000,
        n_blanks: int = 8,
        batch_size: int = 20,
        num_workers: int = 0,
        seed: int = 0,
        val_fraction: float = 0.1,
        shape: Sequence[int] | None = None,
        num_classes: int | None = None,
    ):
        super().__init__(batch_size, num_workers, seed, val_fraction, 0.1, shape, num_classes)
        for key, value, low in (("n_train", n_train, 2), ("n_test", n_test, 1), ("n_blanks", n_blanks, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"data.{key} must be an int >= {low}, got {value!r}")
        if n_blanks > 12:
            raise ValueError(f"data.n_blanks must be <= 12 (a unique 4x4 puzzle keeps >= 4 clues), got {n_blanks}")
        self.n_train, self.n_test, self.n_blanks = n_train, n_test, n_blanks

    def load(self) -> LoadedData:
        generator = torch.Generator().manual_seed(self.seed)
        mask, solutions = generate_puzzles(self.n_train + self.n_test, self.n_blanks, generator)
        x = puzzle_onehot(solutions, mask).to(torch.uint8)
        train = ImageTensorDataset(x[: self.n_train], solutions[: self.n_train])
        test = ImageTensorDataset(x[self.n_train :], solutions[self.n_train :])
        return LoadedData(train, official_test=test,
                          description=f"{self.n_train}+{self.n_test} generated 4x4 puzzles, seed {self.seed}")
