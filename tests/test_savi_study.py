"""benchmarks/savi_study.py: its math against ground truth, and the result layout on a --quick run."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from tests.conftest import ROOT, SHARED_MNIST
from tests.test_bench import quick_run

spec = importlib.util.spec_from_file_location("savi_study", ROOT / "benchmarks" / "savi_study.py")
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)


def small_module(mode: str, **inner):
    from ift.savi.module import SAVIModule

    torch.manual_seed(0)
    module = SAVIModule(input_shape=(1, 3, 4), mode=mode, latent_dim=2, hidden=[8], gamma={"init": 0.1},
                        inner={"max_iter": 60, "tol": 1e-11, **inner}).double().eval()
    return module, torch.rand(6, 12, dtype=torch.float64)


def dense_neg_elbo_hessian(module, x, lam, eps):
    """Hessian of -ELBO per example by generic autodiff (no latent-space structure)."""
    rows = []
    for b in range(x.shape[0]):
        f = lambda l: -module.vae.elbo(x[b:b + 1], l.unsqueeze(0), eps[:, b:b + 1]).sum()  # noqa: E731
        rows.append(torch.autograd.functional.hessian(f, lam[b]))
    return torch.stack(rows)


@pytest.mark.parametrize("eta", [0.5, 3.0])
def test_jacobian_through_the_solver_is_the_proximal_ift_formula(eta):
    """At a stationary point of J = ELBO - ||lam - lam0||^2 / (2 eta): d lam*/d lam0 = (I + eta H)^-1."""
    module, x = small_module("savi_ift", eta=eta)
    jac = study.jacobian(module, x, seed=7)
    gen = torch.Generator().manual_seed(7)  # the draws jacobian() used
    eps = module.vae.sample_eps(x.shape[0], module.hparams.inner_samples, generator=gen, like=x)
    with torch.no_grad():
        result = module.refine(x, module.vae.encode(x), eps)
    assert bool(result.converged.all())
    hess = dense_neg_elbo_hessian(module, x, result.x, eps)
    eye = torch.eye(hess.shape[-1], dtype=hess.dtype)
    torch.testing.assert_close(jac, torch.linalg.inv(eye + eta * hess), rtol=1e-6, atol=1e-8)


def test_jacobian_without_proximal_term_vanishes_and_vae_is_identity():
    module, x = small_module("savi_ift", eta=None)
    assert torch.linalg.matrix_norm(study.jacobian(module, x), ord=2).max() < 1e-6  # the envelope theorem
    vae, x = small_module("vae")
    torch.testing.assert_close(study.jacobian(vae, x), torch.eye(4, dtype=torch.float64).expand(6, 4, 4))


def test_plateau_rule():
    flat = [(0, s, -50 + 10 * (1 - math.exp(-s / 50)), 0) for s in range(0, 1001, 10)]
    assert study.plateau(flat, 1000) is True  # the last 20 % add < 0.5 nats
    rising = [(0, s, -50 + 0.01 * s, 0) for s in range(0, 1001, 10)]
    assert study.plateau(rising, 1000) == pytest.approx(10.0)  # nats per 1000 steps
    assert math.isnan(study.plateau([], 100))


def test_paired_verdicts():
    assert study.verdict([1.0, 1.1, 0.9]) == "first better"
    assert study.verdict([1.0, -1.1, 0.2]) == "tie"
    assert study.reproduces([-2.0, -2.1, -1.9]) == "no (reversed)"
    assert study.reproduces([0.5]) == "n/a (one seed)"


def test_eta_none_is_parsed_and_bad_eta_is_one_line():
    assert study.parse_eta("none") is None and study.parse_eta("10") == 10.0
    with pytest.raises(Exception, match="not > 0"):
        study.parse_eta("-1")


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_MNIST / "train-images-idx3-ubyte.gz").is_file(), reason="no MNIST files")
def test_quick_savi_study_layout(tmp_path):
    """The layout issue 26 specifies, read back from a --quick run of both datasets."""
    doc = quick_run("savi_study.py", tmp_path, timeout=1200)["savi_study.json"]
    assert doc["complete"] is True
    for dataset in ("digits", "mnist"):
        models = doc[dataset]["models"]
        assert set(models) == set(study.MODELS)
        for name, e in models.items():
            assert isinstance(e["seeds"], int) and e["seeds"] == 1
            assert e["plateau"] is True or e["plateau"] is None or isinstance(e["plateau"], float)
            assert len(e["test_iwae"]) == e["seeds"] and all(math.isfinite(v) for v in e["test_iwae"])
            assert len(e["wall_clock_s"]) == len(e["steps"]) == len(e["peak_rss_mb"]) == e["seeds"]
        assert models["savi_ift"]["linsolve_unconverged"] == [0]
        assert models["vae"]["jacobian_norm"] == [pytest.approx(1.0)]
    sweep = doc["digits"]["eta_sweep"]
    assert {(r["model"], r["eta"]) for r in sweep} == {(m, e) for m in study.SWEEP_MODES for e in (1.0, None)}
    assert all("eta" in r and len(r["test_iwae"]) == r["seeds"] for r in sweep)
    runs = sorted((tmp_path / "results" / "savi_study" / "runs").rglob("*.json"))
    assert len(runs) == 2 * len(study.MODELS) + 2
    assert all(json.loads(p.read_text())["provenance"]["quick"] for p in runs)
    text = (tmp_path / "results" / "savi_study.md").read_text()
    assert "reproduces?" in text and "Paired by seed" in text and "eta sweep" in text


def test_max_time_string():
    assert study.hms(3725.2) == "00:01:02:06"
    assert study.hms(90061) == "01:01:01:01"


def test_savi_kim_config_is_kim_et_al_s_loop(compose_train):
    from ift.training import instantiate_model

    module = instantiate_model(compose_train("model=savi_kim").model)
    cfg = module.inner_cfg
    assert module.mode == "savi_unrolled" and module.amortized_weight == 0  # the encoder learns through the loop
    assert (cfg.method, cfg.lr, cfg.momentum, cfg.clip, cfg.max_iter, cfg.tol, cfg.eta) == ("sgd", 1.0, 0.5, 5.0, 20, 0.0, None)
