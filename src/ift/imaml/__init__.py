"""Meta-learning with implicit gradients (iMAML, Rajeswaran et al. 2019) against MAML.

``meta`` holds the math (functional MLP over batched flat weights, the proximal inner problem,
unrolled and implicit adaptation); ``module`` the LightningModule (``model=imaml`` / ``model=maml``
with ``data=sinusoid``).
"""

from ift.imaml.meta import (
    FunctionalMLP,
    IFTConfig,
    InnerSolver,
    NonStationaryError,
    gradient_steps,
    imaml_adapt,
    meta_loss,
    solve_inner,
    task_mse,
    task_objective,
)

__all__ = [
    "FunctionalMLP",
    "IFTConfig",
    "InnerSolver",
    "NonStationaryError",
    "gradient_steps",
    "imaml_adapt",
    "meta_loss",
    "solve_inner",
    "task_mse",
    "task_objective",
]
