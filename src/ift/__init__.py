"""Implicit differentiation in machine learning.

Subpackages:
  implicit   the implicit function theorem as a small autograd API
  savi       Dai et al. VAE with semi-amortized inference (unrolled or IFT)
  optnet     batched differentiable QP layer and OptNet models
  saliency   classifiers, PGD, explanations, infidelity / max-sensitivity
  data       LightningDataModules
  telemetry  memory / speed callbacks
"""

__version__ = "0.1.0"
