"""An independent implementation of SENS_max and INFD: Quantus 0.6 (Hedström et al. 2023), an
optional dependency (``pip install quantus==0.6.0``, part of the ``bench`` extra).

Settings are matched to ours and stated in the returned dicts:
- MaxSensitivity: uniform noise in the L-inf ball of ``radius`` (Quantus' ``batch_uniform_noise``, its own
  NumPy draws), ``||Phi(y) - Phi(x)||_2 / ||Phi(x)||_2`` (Frobenius norms, ``difference``), max over
  ``samples``, no clipping, no attribution normalisation or absolute value, kept when the
  prediction changes: our ``max_sensitivity(normalize="input")``. Agreement is statistical (different
  draws): within 3 standard errors of the per-image difference.
- Infidelity: Quantus' square removal (``patch`` x ``patch`` blocks set to black, each block added to
  the blocks already removed, its own loop), squared error without the optimal scaling. Our
  ``infidelity_from_perturbations(optimal_scaling=False)`` is evaluated on the very perturbations
  Quantus applied (recorded from its perturbation function), so the two must agree to rounding.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from ift.saliency.measures import infidelity_from_perturbations


def require_quantus():
    try:
        import quantus
    except ImportError as err:
        raise ImportError("the Quantus cross-check needs quantus 0.6: pip install quantus==0.6.0 "
                          "(or the bench extra)") from err
    return quantus


def numpy_explain(explain: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """Quantus' ``explain_func(model, inputs, targets, **kwargs) -> ndarray`` around ours."""
    def fn(model=None, inputs=None, targets=None, **kwargs):
        x = torch.as_tensor(np.asarray(inputs), dtype=torch.float32)
        t = torch.as_tensor(np.asarray(targets), dtype=torch.long)
        return explain(x, t).detach().numpy()
    return fn


def quantus_max_sensitivity(net: nn.Module, explain, x: torch.Tensor, y: torch.Tensor, radius: float = 0.1,
                            samples: int = 50, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Per-example Quantus MaxSensitivity of ``explain`` and the settings used."""
    quantus = require_quantus()
    np.random.seed(seed)  # Quantus draws its noise from NumPy's global generator
    metric = quantus.MaxSensitivity(nr_samples=samples, lower_bound=radius,  # batch_uniform_noise: U(-r, r)
                                    norm_numerator=quantus.norm_func.fro_norm,
                                    norm_denominator=quantus.norm_func.fro_norm,
                                    similarity_func=quantus.similarity_func.difference, abs=False, normalise=False,
                                    return_nan_when_prediction_changes=False, disable_warnings=True)
    scores = metric(model=net.eval(), x_batch=x.numpy(), y_batch=y.numpy(), a_batch=None,
                    explain_func=numpy_explain(explain), device="cpu", batch_size=len(x))
    settings = {"metric": "quantus.MaxSensitivity", "radius": radius, "samples": samples,
                "perturb_func": "batch_uniform_noise", "norms": "fro / fro", "similarity": "difference",
                "clip": False, "seed": seed}
    return np.asarray(scores, dtype=np.float64), settings


def quantus_infidelity(net: nn.Module, phi: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                       patch: int = 4) -> tuple[np.ndarray, np.ndarray, dict]:
    """Per-example Quantus Infidelity of the local explanation ``phi`` (black square removal of side
    ``patch``) and ours on the perturbations it applied; returns (quantus, ours, settings)."""
    quantus = require_quantus()
    from quantus.functions.perturb_func import batch_baseline_replacement_by_indices

    applied = []

    def recording(arr, **kwargs):
        out = batch_baseline_replacement_by_indices(arr=arr, **kwargs)
        applied.append(out.copy())
        return out

    metric = quantus.Infidelity(perturb_patch_sizes=[patch], n_perturb_samples=1, loss_func="mse",
                                perturb_func=recording, perturb_baseline="black", abs=False, normalise=False,
                                disable_warnings=True)
    scores = metric(model=net.eval(), x_batch=x.numpy(), y_batch=y.numpy(), a_batch=phi.detach().numpy(),
                    device="cpu", batch_size=len(x), softmax=False)
    perturbed = torch.as_tensor(np.stack(applied)).view(len(applied), *x.shape).to(x.dtype)
    ours = infidelity_from_perturbations(net, x, phi.detach(), x.unsqueeze(0) - perturbed, y, optimal_scaling=False)
    settings = {"metric": "quantus.Infidelity", "patch": patch, "baseline": "black", "loss": "mse",
                "optimal_scaling": False, "perturbations": len(applied)}
    return np.asarray(scores, dtype=np.float64), ours.numpy(), settings
