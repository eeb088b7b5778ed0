"""Classifiers, PGD, explanations and their infidelity / max-sensitivity (Yeh et al. 2019).

Public API::

    infidelity(forward, x, explanation, perturbation="noisy_baseline" | "square", n_samples=..., target=...)
    max_sensitivity(explain, x, radius=..., n_samples=...)
    make_explanation(name, model, ...)   # "Grad", "Grad-SG", "IG", "IG-SG", "GBP", "GBP-SG", "SHAP", "Square", "NB"
    pgd_attack(model, x, y, eps, step_size, steps)
    build_network(arch, input_shape, num_classes)
"""

from ift.saliency.explanations import (METHODS, Explanation, gradient, guided_backprop, integrated_gradients,
                                       kernel_shap, make_explanation, optimal_noisy_baseline, optimal_square,
                                       smooth, to_global)
from ift.saliency.measures import infidelity, max_sensitivity
from ift.saliency.networks import build_network, default_arch
from ift.saliency.pgd import pgd_attack
from ift.saliency.probes import input_gradient_norm, input_hessian_norm, softplus_gradient_lipschitz

__all__ = [
    "METHODS", "Explanation", "build_network", "default_arch", "gradient", "guided_backprop", "infidelity",
    "input_gradient_norm", "input_hessian_norm", "integrated_gradients", "kernel_shap", "make_explanation",
    "max_sensitivity", "optimal_noisy_baseline", "optimal_square", "pgd_attack", "smooth",
    "softplus_gradient_lipschitz", "to_global",
]
