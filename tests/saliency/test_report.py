"""SaliencyConfig options and evaluate_method's shared INFD cache and per-method SENS limits."""

import pytest
import torch
from torch import nn

from ift.saliency import gradient, infidelity, max_sensitivity
from ift.saliency.report import SaliencyConfig, evaluate_method, infidelity_cache, markdown_table, saliency_table


def small_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()


def test_config_options_and_bad_values():
    cfg = SaliencyConfig.from_dict({"sens_normalize": ["unit", "input"], "sg_global": "mean_of_products",
                                    "method_sens": {"Square": {"examples": 2, "samples": 3}}})
    assert cfg.normalizations == ("unit", "input") and cfg.method_sens["Square"] == {"examples": 2, "samples": 3}
    assert SaliencyConfig().normalizations == ("input",)
    with pytest.raises(ValueError, match=r"eval\.saliency\.sens_normalize"):
        SaliencyConfig(sens_normalize="l2")
    with pytest.raises(ValueError, match=r"eval\.saliency\.sg_global"):
        SaliencyConfig(sg_global="authors")
    with pytest.raises(ValueError, match=r"eval\.saliency\.method_sens"):
        SaliencyConfig(method_sens={"Square": {"examples": 0}})
    with pytest.raises(ValueError, match=r"eval\.saliency\.method_sens"):
        SaliencyConfig(method_sens={"Nope": {"examples": 1}})


def test_evaluate_method_matches_direct_measures_and_uses_limits():
    """Grad row = the measures called directly (square INFD of x * grad, SENS of x * grad), with
    the cache or without, every normalisation from the same samples, and SENS on the limited subset."""
    model = small_cnn()
    x = torch.rand(4, 1, 6, 6)
    y = torch.tensor([0, 1, 2, 1])
    cfg = SaliencyConfig(sens_samples=5, sens_normalize=("input", "unit", "none"), square_sizes=(1, 2),
                         infd_samples=30, method_sens={"Grad": {"examples": 3, "samples": 4}})
    metrics, phi = evaluate_method(model, "Grad", x, y, cfg, local=False)
    cached, _ = evaluate_method(model, "Grad", x, y, cfg, local=False, cache=infidelity_cache(model, x, y, cfg))
    assert metrics["infd"] == pytest.approx(cached["infd"]) and metrics["sens_max_unit"] == cached["sens_max_unit"]
    grad = gradient(model)
    assert torch.allclose(phi, x * grad(x, y))
    direct = infidelity(model, x, grad(x, y), "square", None, y, square_sizes=(1, 2))
    assert metrics["infd"] == pytest.approx(float(direct.mean()), rel=1e-6)
    assert metrics["sens_examples"] == 3 and metrics["sens_samples"] == 4
    sens = max_sensitivity(lambda z, t: z * grad(z, t), x[:3], cfg.sens_radius, 4, y[:3], normalize="unit",
                           generator=torch.Generator().manual_seed(cfg.seed + 2))
    assert metrics["sens_max_unit"] == pytest.approx(float(sens.mean()))
    assert metrics["sens_max"] == metrics["sens_max_input"]
    tables, maps = saliency_table(model, x, y, SaliencyConfig(methods=("Grad", "Grad-SG"), sens_samples=2, sg_samples=2,
                                                              sens_normalize=("input", "unit"), square_sizes=(1, 2)))
    md = markdown_table(tables)
    assert "SENS_max (input)" in md and "SENS_max (unit)" in md and set(maps) == {"Grad", "Grad-SG"}


def test_square_row_from_cached_drops_equals_the_explanation():
    """The Square row's explanation at x comes from the INFD cache; it must equal optimal_square."""
    from ift.saliency import optimal_square

    model = small_cnn(1).double()
    x = torch.rand(3, 1, 6, 6, dtype=torch.float64)
    y = torch.tensor([2, 0, 1])
    cfg = SaliencyConfig(methods=("Square",), sens_samples=2, square_sizes=(1, 3))
    _, phi = evaluate_method(model, "Square", x, y, cfg, local=False, cache=infidelity_cache(model, x, y, cfg))
    assert torch.allclose(phi, optimal_square(model, (1, 3))(x, y), atol=1e-10)
