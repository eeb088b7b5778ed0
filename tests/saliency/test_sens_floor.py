"""The SENS floor controls: clipped perturbations, local vs global SENS, a linear model's known answers."""

import pytest
import torch
from torch import nn

from ift.saliency import max_sensitivity
from ift.saliency.measures import max_sensitivities, uniform_linf_noise
from ift.saliency.report import SaliencyConfig, evaluate_method


def linear_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 3)).double().eval()


def test_clip_keeps_every_scored_point_in_the_pixel_range():
    x = torch.zeros(3, 1, 4, 4, dtype=torch.float64)
    x[:, :, 1:3, 1:3] = 1.0
    seen = []

    def explain(z):
        seen.append(z.clone())
        return z + 1.0  # nonzero at x so every normalisation is defined

    noise = uniform_linf_noise((5, *x.shape), 0.1, x, torch.Generator().manual_seed(0))
    clipped = max_sensitivity(explain, x, 0.1, noise=noise, normalize="none", clip=(0.0, 1.0))
    ys = torch.cat(seen[1:])
    assert ys.min() >= 0 and ys.max() <= 1
    # closed form: the identity-plus-one explanation moves by exactly the clipped delta
    expected = ((x.unsqueeze(0) + noise).clamp(0, 1) - x.unsqueeze(0)).flatten(2).norm(dim=2).max(0).values
    torch.testing.assert_close(clipped, expected)
    unclipped = max_sensitivity(lambda z: z + 1.0, x, 0.1, noise=noise, normalize="none")
    torch.testing.assert_close(unclipped, noise.flatten(2).norm(dim=2).max(0).values)
    assert (clipped < unclipped).all()


def test_linear_model_local_sens_is_zero_and_global_sens_is_the_delta_times_w_floor():
    """Grad of a linear model is its weight row w_y (constant): local SENS is exactly 0 under every
    normalisation, the global x * Phi moves by delta * w_y, so SENS(none) = max_k ||delta_k * w_y||."""
    model = linear_model()
    x = torch.rand(4, 1, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    cfg = SaliencyConfig(sens_samples=7, sens_normalize=("input", "unit", "none"), square_sizes=(1, 2),
                         sens_variants=("local", "local_clipped", "global_clipped"), per_example=True)
    metrics, _ = evaluate_method(model, "Grad", x, y, cfg, local=False)
    for norm in ("input", "unit", "none"):
        assert metrics[f"sens_max_local_{norm}"] == 0 and metrics[f"sens_max_local_clipped_{norm}"] == 0
        assert metrics[f"sens_max_{norm}"] > 0
    gen = torch.Generator().manual_seed(cfg.seed + 2)  # evaluate_method's SENS draws
    noise = uniform_linf_noise((7, *x.shape), cfg.sens_radius, x, gen)
    w = model[1].weight.detach()[y].view(4, 1, 6, 6)
    floor = (noise * w.unsqueeze(0)).flatten(2).norm(dim=2).max(0).values
    torch.testing.assert_close(torch.tensor(metrics["per_example"]["sens_max_none"], dtype=torch.float64), floor)
    clipped = (((x.unsqueeze(0) + noise).clamp(0, 1) - x.unsqueeze(0)) * w.unsqueeze(0)).flatten(2).norm(dim=2)
    torch.testing.assert_close(torch.tensor(metrics["per_example"]["sens_max_global_clipped_none"],
                                            dtype=torch.float64), clipped.max(0).values)
    assert len(metrics["per_example"]["infd"]) == 4 and metrics["infd_rel_sem"] >= 0


def test_sens_variants_share_deltas_and_skip_global_methods():
    model = linear_model().float()
    x = torch.rand(2, 1, 6, 6)
    y = torch.tensor([0, 2])
    cfg = SaliencyConfig(sens_samples=3, square_sizes=(1, 2), sens_variants=("global",), shap_samples=20)
    grad, _ = evaluate_method(model, "Grad", x, y, cfg, local=False)
    assert grad["sens_max_global_input"] == pytest.approx(grad["sens_max_input"])  # the same deltas
    square, _ = evaluate_method(model, "Square", x, y, cfg, local=False)
    assert not any(k.startswith("sens_max_global") for k in square)
    with pytest.raises(ValueError, match=r"eval\.saliency\.sens_variants"):
        SaliencyConfig(sens_variants=("clipped",))
    with pytest.raises(ValueError, match=r"eval\.saliency\.method_sens"):
        SaliencyConfig(method_sens={"Grad": {"variants": ["nope"]}})
    assert SaliencyConfig.from_dict({"clip": True, "sens_variants": ["local"]}).clip


def test_max_sensitivities_clip_none_equals_default():
    x = torch.rand(2, 1, 3, 3)
    noise = uniform_linf_noise((4, *x.shape), 0.2, x, torch.Generator().manual_seed(1))
    f = lambda z: z.pow(2) + 0.1
    a = max_sensitivities(f, x, 0.2, noise=noise, normalizations=("input", "unit"))
    b = max_sensitivities(f, x, 0.2, noise=noise, normalizations=("input", "unit"), clip=None)
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_constant_explanation_is_the_floor_of_the_global_measure():
    """Phi = 1 ignores the model: local SENS_max is 0, the global x * 1 = x moves by exactly delta, so
    SENS(none) = max_k ||delta_k|| and SENS(input) = that / ||x||; the same for any model."""
    x = torch.rand(4, 1, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    cfg = SaliencyConfig(methods=("Constant",), sens_samples=5, sens_normalize=("none", "input"), square_sizes=(1, 2),
                         sens_variants=("local",), per_example=True)
    metrics = {seed: evaluate_method(linear_model(seed), "Constant", x, y, cfg, local=False)[0] for seed in (0, 1)}
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    noise = uniform_linf_noise((5, *x.shape), cfg.sens_radius, x, gen)
    floor = noise.flatten(2).norm(dim=2).max(0).values
    for m in metrics.values():
        assert m["sens_max_local_none"] == 0 and m["sens_max_local_input"] == 0
        torch.testing.assert_close(torch.tensor(m["per_example"]["sens_max_none"], dtype=torch.float64), floor)
        torch.testing.assert_close(torch.tensor(m["per_example"]["sens_max_input"], dtype=torch.float64),
                                   floor / x.flatten(1).norm(dim=1))
    assert metrics[0]["per_example"]["sens_max_none"] == metrics[1]["per_example"]["sens_max_none"]
    assert metrics[0]["infd"] != metrics[1]["infd"]  # its INFD does depend on the model
    with pytest.raises(ValueError, match="control"):
        from ift.saliency.explanations import make_explanation
        make_explanation("Nothing", linear_model())
