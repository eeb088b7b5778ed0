"""Appendix A.3 of Yeh et al. 2019 on CPU: which way of robustifying gradients buys the largest drop in
SENS_max and INFD per unit of accuracy and of compute? And the appendix's bounds on the trained models.

Models (all the bias-free Softplus MLP of Proposition A.1, so every bound and the Hessian regulariser
apply): regular, PGD (eps 0.1, 10 steps), gradient-norm penalty (double backprop), input-Hessian
regulariser (Hutchinson HVPs), L2 weight penalty. Each penalty weight is chosen on digits' validation
split (seed 0): the largest on its grid whose validation accuracy stays within ``--val-drop`` of the
regular model's. Then, for every seed: test / PGD accuracy, training time (1 torch thread), the
Table 4 setting (x * Phi under square removal, NB local) plus the local Grad row, gradient / Hessian
norms; for the first seed also Theorem C.1 (RINFD vs its lower bound) and the A.2 bounds for Grad;
last, Theorem A.1 on a binary task (digit >= 5) against the measured adversarial logistic loss.

    python benchmarks/saliency_robustifiers.py   # results/saliency_robustifiers.{json,md}
    python benchmarks/saliency_robustifiers.py --quick                      # seconds-long smoke run into /tmp
    python benchmarks/saliency_robustifiers.py --step-costs-only   # re-time steps only

Digits only: MNIST's CPU setting of the Table 4 study does not fit this session's CPU budget.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import lightning as L
import torch
from sklearn.datasets import load_digits

from ift.data import DigitsDataModule
from ift.data.base import ImageTensorDataset, LoadedData
from ift.saliency import input_gradient_norm, input_hessian_norm
from ift.saliency.measures import noisy_baseline_perturbations
from ift.saliency.module import ClassifierModule, first_examples
from ift.saliency.report import SaliencyConfig, saliency_table
from ift.saliency.theory import class_score, gradient_bounds_a2, gradient_explainer, theorem_a1, theorem_c1

MODELS = ("regular", "pgd", "grad_norm", "hessian", "l2")
SIZES = {
    "full": dict(epochs=40, hidden=(64, 64), lr=3e-3, eps=0.1, step_size=0.025, steps=10, eval_steps=20, seeds=(0, 1, 2, 3, 4),
                 grids={"grad_norm": [0.03, 0.1, 0.3, 1.0], "hessian": [1.0, 3.0, 10.0, 30.0], "l2": [1e-3, 3e-3, 1e-2, 3e-2]},
                 examples=40, theory_examples=10, theory_pert=64, theory_steps=15, hess_points=16,
                 sal=dict(methods=("Grad", "Grad-SG", "IG", "Square", "NB"), sens_samples=20, infd_samples=500,
                          sg_samples=30, nb_samples=3000, ig_steps=10, square_sizes=(1, 4), local=True,
                          sens_variants=("local", "global_clipped")),
                 a1=dict(examples=40, eps_linf=0.05, eps_l2=0.5, attack_steps=50, restarts=2)),
    "quick": dict(epochs=2, hidden=(16,), lr=3e-3, eps=0.1, step_size=0.05, steps=2, eval_steps=2, seeds=(0, 1),
                  grids={"grad_norm": [0.1, 1.0], "hessian": [0.1, 1.0], "l2": [1e-3, 1e-2]},
                  examples=4, theory_examples=2, theory_pert=8, theory_steps=2, hess_points=2,
                  sal=dict(methods=("Grad", "Square"), sens_samples=2, infd_samples=20, sg_samples=2, nb_samples=100,
                           ig_steps=3, square_sizes=(1, 2), local=True, sens_variants=("local", "global_clipped")),
                  a1=dict(examples=4, eps_linf=0.05, eps_l2=0.5, attack_steps=3, restarts=1)),
}


class BinaryDigits(DigitsDataModule):
    """8x8 digits relabelled ``digit >= 5`` (Theorem A.1's binary logistic setting), same splits."""

    num_classes = 2

    def load(self) -> LoadedData:
        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.uint8).unsqueeze(1)
        labels = torch.as_tensor(digits.target >= 5, dtype=torch.int64)
        return LoadedData(ImageTensorDataset(images, labels, scale=16.0), description="digits, label digit >= 5")


def make_model(dm, kind: str, weight: float, spec: dict) -> ClassifierModule:
    robust = {"regular": "none", "pgd": "none"}.get(kind, kind)
    return ClassifierModule(dm.shape, dm.num_classes, arch="softplus_mlp", hidden=spec["hidden"], lr=spec["lr"],
                            pgd=kind == "pgd", eps=spec["eps"], step_size=spec["step_size"], steps=spec["steps"],
                            eval_steps=spec["eval_steps"], robust=robust, robust_weight=weight)


def train(dm, kind: str, weight: float, spec: dict, seed: int) -> tuple[ClassifierModule, dict]:
    """Fit without validation (so the time is training only), then validate and test."""
    L.seed_everything(seed, workers=True)
    model = make_model(dm, kind, weight, spec)
    opts = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0)
    t0 = time.perf_counter()
    L.Trainer(max_epochs=spec["epochs"], limit_val_batches=0, **opts).fit(model, datamodule=dm)
    seconds = time.perf_counter() - t0
    trainer = L.Trainer(**opts)
    metrics = {**trainer.validate(model, datamodule=dm, verbose=False)[0], **trainer.test(model, datamodule=dm, verbose=False)[0]}
    return model.eval(), {"train_seconds": seconds, **{k: float(v) for k, v in metrics.items()}}


def step_loss(model: ClassifierModule, kind: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The training loss of ``ClassifierModule.training_step`` without Lightning's logging."""
    if kind == "pgd":
        return torch.nn.functional.cross_entropy(model(model.adversarial(x, y, model.attack["steps"])), y)
    if kind == "regular":
        return torch.nn.functional.cross_entropy(model(x), y)
    logits, penalty = model.penalised_forward(x, y)
    return torch.nn.functional.cross_entropy(logits, y) + model.hparams.robust_weight * penalty


def step_costs(dm, weights: dict, spec: dict, rounds: int = 7, steps: int = 20) -> dict:
    """Milliseconds per training step (loss, backward, Adam) on one batch of 128, the kinds interleaved
    in each of ``rounds`` rounds; median over rounds and the ratio to the regular model's median.
    Lightning's per-step overhead (a few ms, the same for every kind) is left out: it dominates
    the wall-clock training time of a model this small."""
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    models = {k: make_model(dm, k, weights.get(k, 0.0), spec) for k in MODELS}
    opts = {k: torch.optim.Adam(m.parameters(), spec["lr"]) for k, m in models.items()}
    times = {k: [] for k in MODELS}
    for _ in range(rounds):
        for k in MODELS:
            t0 = time.perf_counter()
            for _ in range(steps):
                opts[k].zero_grad()
                step_loss(models[k], k, x, y).backward()
                opts[k].step()
            times[k].append(1e3 * (time.perf_counter() - t0) / steps)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {k: {"ms_per_step": med[k], "ratio": med[k] / med["regular"], "rounds_ms": times[k]} for k in MODELS}


def select_weights(dm, spec: dict, val_drop: float, log: dict, save) -> dict[str, float]:
    """Per robustifier, the largest grid weight with val acc >= regular's - val_drop (seed 0)."""
    _, ref = train(dm, "regular", 0.0, spec, 0)
    log["selection"] = {"regular": ref, "rule": f"largest weight with val/acc >= {ref['val/acc']:.4f} - {val_drop}"}
    chosen = {}
    for kind, grid in spec["grids"].items():
        rows = []
        for w in grid:
            _, m = train(dm, kind, w, spec, 0)
            rows.append({"weight": w, **m})
            print("select", kind, w, {k: round(m[k], 4) for k in ("val/acc", "val/pgd_acc", "train_seconds")}, flush=True)
        ok = [r["weight"] for r in rows if r["val/acc"] >= ref["val/acc"] - val_drop]
        chosen[kind] = max(ok) if ok else min(grid)
        log["selection"][kind] = {"grid": rows, "chosen": chosen[kind]}
        save()
    return chosen


def mean(t: torch.Tensor) -> float:
    return float(t.double().mean())


def theory_checks(net, x, y, spec: dict) -> dict:
    """Theorem C.1 and A.2 for Grad of the true-class logit on the first examples."""
    g = torch.Generator().manual_seed(0)
    f = class_score(net, y)
    pert = noisy_baseline_perturbations(x, spec["theory_pert"], generator=g)
    c1 = theorem_c1(f, gradient_explainer(f), x, pert, radius=0.1, steps=spec["theory_steps"], generator=g)
    # A.2: local perturbations of the same radius as SENS (uniform in the L-inf ball), where the bound is local too
    local = (2 * torch.rand((spec["theory_pert"], *x.shape), generator=g) - 1) * 0.1
    a2 = gradient_bounds_a2(net, f, x, 0.1, local, hess_points=spec["hess_points"], ascent_steps=spec["theory_steps"],
                            generator=g)
    a2_nb = gradient_bounds_a2(net, f, x, 0.1, pert, hess_points=spec["hess_points"], ascent_steps=spec["theory_steps"],
                               generator=g)
    out = {"c1": {k: mean(v) for k, v in c1.items()}, "per_example": {
               "c1": {k: v.tolist() for k, v in c1.items()},
               "a2": {k: a2[k].tolist() for k in ("sens_ascent", "sens_bound", "sens_bound_path", "infd", "infd_bound")}},
           "c1_holds": int((c1["rinfd"] >= c1["bound"] * (1 - 1e-6)).sum()), "c1_nontrivial": int((c1["bound"] > 0).sum()),
           "a2": {k: mean(v) for k, v in a2.items()},
           "a2_infd_noisy_baseline": {k: mean(a2_nb[k]) for k in ("infd", "infd_bound", "infd_bound_paper")},
           "n": len(x)}
    out["a2"]["sens_tightness"] = mean(a2["sens_ascent"] / a2["sens_bound"])
    out["a2"]["sens_tightness_a1"] = mean(a2["sens_ascent"] / a2["sens_bound_a1"])
    out["a2"]["infd_tightness"] = mean(a2["infd"] / a2["infd_bound"])
    out["a2"]["sens_holds"] = int((a2["sens_ascent"] <= a2["sens_bound"]).sum())
    out["a2"]["sens_path_holds"] = int((a2["sens_ascent"] <= a2["sens_bound_path"] * (1 + 1e-6)).sum())
    out["a2"]["infd_holds"] = int((a2["infd"] <= a2["infd_bound"]).sum())
    out["a2"]["sens_tightness_path"] = mean(a2["sens_ascent"] / a2["sens_bound_path"])
    out["a2_infd_noisy_baseline"]["tightness"] = mean(a2_nb["infd"] / a2_nb["infd_bound"])
    return out


def evaluate(model: ClassifierModule, dm, spec: dict, theory: bool) -> dict:
    net = model.net.eval()
    x, y = first_examples(dm, spec["examples"])
    t0 = time.perf_counter()
    tables, _ = saliency_table(net, x, y, SaliencyConfig(**spec["sal"]))
    f = class_score(net, y)
    probes = {"grad_norm": mean(input_gradient_norm(f, x)),
              "hessian_norm": mean(input_hessian_norm(f, x, iters=30, generator=torch.Generator().manual_seed(0)))}
    n = spec["theory_examples"]
    out = {"tables": tables, "probes": probes}
    if theory:
        out["theory"] = theory_checks(net, x[:n].clone(), y[:n].clone(), spec)
    return {**out, "eval_seconds": time.perf_counter() - t0}


def linear_control(dm, spec: dict) -> dict:
    """The SENS-floor control: a bias-free linear model (the Softplus MLP without hidden layers), whose
    Grad is constant, so its global SENS_max is the x * Phi floor and its local SENS_max is 0."""
    L.seed_everything(0, workers=True)
    model = ClassifierModule(dm.shape, dm.num_classes, arch="softplus_mlp", hidden=(), lr=spec["lr"], eval_pgd=False)
    opts = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0)
    trainer = L.Trainer(max_epochs=spec["epochs"], limit_val_batches=0, **opts)
    trainer.fit(model, datamodule=dm)
    acc = float(L.Trainer(**opts).test(model, datamodule=dm, verbose=False)[0]["test/acc"])
    x, y = first_examples(dm, spec["examples"])
    tables, _ = saliency_table(model.net.eval(), x, y, SaliencyConfig(**{**spec["sal"], "methods": ("Grad",)}))
    return {"test/acc": acc, "Grad": tables["global"]["Grad"]}


def theorem_a1_study(weights: dict, spec: dict, log: dict, save) -> None:
    """Binary digits (>= 5): the logit f = z_1 - z_0 of the two-class model makes CE the logistic loss."""
    dm = BinaryDigits(batch_size=128, seed=0)
    a1 = spec["a1"]
    log["theorem_a1"] = {}
    for kind in MODELS:
        model, metrics = train(dm, kind, weights.get(kind, 0.0), spec, 0)
        net = model.net
        x, y = first_examples(dm, a1["examples"])
        f = lambda z: net(z)[:, 1] - net(z)[:, 0]
        row = {"test/acc": metrics["test/acc"], "test/pgd_acc": metrics["test/pgd_acc"]}
        for norm, eps in (("linf", a1["eps_linf"]), ("l2", a1["eps_l2"])):
            r = theorem_a1(net, f, x, y, eps, norm=norm, attack_steps=a1["attack_steps"], restarts=a1["restarts"],
                           hess_points=spec["hess_points"], generator=torch.Generator().manual_seed(0))
            excess = (r["adv_loss"] - r["natural_loss"]).clamp_min(1e-12)
            row[norm] = {"eps": eps, **{k: mean(v) for k, v in r.items()}, "holds": int((r["adv_loss"] <= r["rhs"]).sum()),
                         "n": len(x), "rhs_over_adv": mean(r["rhs"] / r["adv_loss"]),
                         "excess_ratio": float((r["rhs"] - r["natural_loss"]).sum() / excess.sum())}
        log["theorem_a1"][kind] = row
        print("A.1", kind, {n: (round(row[n]["adv_loss"], 4), round(row[n]["rhs"], 4)) for n in ("linf", "l2")}, flush=True)
        save()


# ----------------------------------------------------------------------------- summary
def stats(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def fmt(values: list[float], digits: int = 3) -> str:
    m, sd = stats(values)
    return f"{m:.{digits}g} ± {sd:.2g}"


def summary_markdown(log: dict) -> str:
    runs, spec = log["runs"], log["spec"]
    kinds = [k for k in MODELS if any(r["kind"] == k for r in runs)]
    by = {k: [r for r in runs if r["kind"] == k] for k in kinds}
    seeds = sorted({r["seed"] for r in runs})
    md = [f"Digits (8x8, full size), bias-free Softplus MLP {tuple(spec['hidden'])}, {spec['epochs']} epochs, Adam lr "
          f"{spec['lr']}; seeds {seeds}; mean ± sd over seeds. PGD accuracy: eps {spec['eps']}, {spec['eval_steps']} steps. "
          f"Penalty weights chosen on validation (seed 0): {log.get('weights')}. Explanations of the true-class logit on the "
          f"first {spec['examples']} test examples.", "",
          "Grad SENS_max is of the global x * Phi at y = x + delta; 'local' is SENS_max of Phi itself and 'clipped' the "
          "global one at y clipped to [0, 1], from the same deltas; the linear row is the floor of the global form "
          "(its Phi is constant).", "",
          "| model | weight | test acc | test PGD acc | train s (1 thread) | step cost (ms ratio) | Grad SENS_max | "
          "Grad SENS_max local | Grad SENS_max clipped | Grad INFD (global) | "
          "Grad INFD/INFD(0) | Grad INFD (local) | mean grad norm | mean Hessian norm |", "|---" * 14 + "|"]
    costs = log.get("step_costs", {})
    for k in kinds:
        rs = by[k]
        g, loc = [r["eval"]["tables"]["global"]["Grad"] for r in rs], [r["eval"]["tables"]["local"]["Grad"] for r in rs]
        cost = f"{costs[k]['ratio']:.2f}x" if k in costs else "-"
        md.append(f"| {k} | {rs[0]['weight']:g} | {fmt([r['metrics']['test/acc'] for r in rs])} | "
                  f"{fmt([r['metrics']['test/pgd_acc'] for r in rs])} | {fmt([r['metrics']['train_seconds'] for r in rs])} | "
                  f"{cost} | {fmt([m['sens_max'] for m in g])} | {fmt([m.get('sens_max_local_input', math.nan) for m in g])} | "
                  f"{fmt([m.get('sens_max_global_clipped_input', math.nan) for m in g])} | {fmt([m['infd'] for m in g])} | "
                  f"{fmt([m['infd_rel'] for m in g])} | {fmt([m['infd'] for m in loc])} | "
                  f"{fmt([r['eval']['probes']['grad_norm'] for r in rs])} | {fmt([r['eval']['probes']['hessian_norm'] for r in rs])} |")
    lin = log.get("linear_control")
    if lin:
        g = lin["Grad"]
        md.append(f"| linear (control, bias-free) | - | {lin['test/acc']:.3f} | - | - | - | {g['sens_max']:.3g} | "
                  f"{g.get('sens_max_local_input', math.nan):.3g} | {g.get('sens_max_global_clipped_input', math.nan):.3g} | "
                  f"{g['infd']:.3g} | {g['infd_rel']:.3g} | - | - | 0 |")
    if "regular" in by:
        md += ["", "Per unit of accuracy and compute (Grad, means over seeds, relative to regular): drop in SENS_max and in "
               "global INFD (in % of the regular model's), per accuracy point lost and per unit of extra compute "
               "(step cost - 1, the micro-benchmark's ratio). Accuracy points lost ± 2 standard errors of the difference of "
               "the seed means; 'n/a' where the loss is within that noise.", "",
               "| model | SENS_max drop % | INFD drop % | acc points lost | extra compute | SENS drop % / acc pt | "
               "INFD drop % / acc pt | SENS drop % / extra compute | INFD drop % / extra compute |", "|---" * 9 + "|"]
        base = {key: stats([f(r) for r in by["regular"]])[0] for key, f in EFFICIENCY_KEYS.items()}
        for k in kinds:
            if k == "regular":
                continue
            cur = {key: stats([f(r) for r in by[k]])[0] for key, f in EFFICIENCY_KEYS.items()}
            ds = 100 * (1 - cur["sens"] / base["sens"])
            di = 100 * (1 - cur["infd"] / base["infd"])
            acc_lost = 100 * (base["acc"] - cur["acc"])
            # an accuracy change within 2 standard errors of the difference of seed means is noise
            se = 100 * math.sqrt(sum(stats([r["metrics"]["test/acc"] for r in by[m]])[1] ** 2 / len(by[m])
                                     for m in ("regular", k)))
            extra = costs[k]["ratio"] - 1 if k in costs else math.nan
            per = lambda a, b, floor: f"{a / b:.3g}" if b > floor else "n/a"
            md.append(f"| {k} | {ds:.1f} | {di:.1f} | {acc_lost:.2f} ± {2 * se:.2f} | {extra:.2f} | {per(ds, acc_lost, 2 * se)} | "
                      f"{per(di, acc_lost, 2 * se)} | {per(ds, extra, 0.05)} | {per(di, extra, 0.05)} |")
    md += ["", "Table 4 setting per model (x * Phi under square removal; NB local), seed 0:", ""]
    md += method_table({k: by[k][0]["eval"]["tables"] for k in kinds})
    md += ["", "Theorem C.1 (Grad, noisy-baseline I, fixed 64 samples, ||u||_inf <= 0.1; seed 0, mean over examples): "
           "RINFD >= (max(0, A - B(x) - B(x - I)) / 2)^2.", "",
           "| model | RINFD | INFD (u = 0) | A | B(x) | B(x - I) | bound | holds | bound > 0 |", "|---|---|---|---|---|---|---|---|---|"]
    for k in kinds:
        t = by[k][0]["eval"]["theory"]
        c = t["c1"]
        md.append(f"| {k} | {c['rinfd']:.4g} | {c['infd']:.4g} | {c['A']:.4g} | {c['B']:.4g} | {c['B_shift']:.4g} | "
                  f"{c['bound']:.3g} | {t['c1_holds']}/{t['n']} | {t['c1_nontrivial']}/{t['n']} |")
    md += ["", "A.2 for Grad (seed 0, mean over examples; L-inf ball r = 0.1, its L2 radius R = r sqrt(64) = 0.8): "
           "SENS = max ||grad f(x+u) - grad f(x)||_2 by ascent vs L_ball R (L_ball: largest Hessian spectral norm over x "
           "and 16 sampled ball points), vs L_path r* (largest Hessian norm on 20 points of the segment from x to the "
           "ascent's maximiser u*, r* = ||u*||_2: the mean value theorem) and vs Proposition A.1's certified L_A1 R; INFD (unscaled) of I uniform in the same "
           "ball vs mean L_I^2 ||I||^4 / 4, and of the noisy-baseline I.", "",
           "| model | SENS ascent | SENS MC | L_ball R | SENS / (L_ball R) [holds] | SENS / (L_path r*) [holds] | L_A1 R | "
           "SENS / (L_A1 R) | INFD local I | bound | INFD / bound [holds] | INFD NB I | bound | INFD / bound |",
           "|---" * 14 + "|"]
    for k in kinds:
        t = by[k][0]["eval"]["theory"]
        a, nb = t["a2"], t["a2_infd_noisy_baseline"]
        n = t["n"]
        md.append(f"| {k} | {a['sens_ascent']:.4g} | {a['sens_mc']:.4g} | {a['sens_bound']:.4g} | "
                  f"{a['sens_tightness']:.3g} [{a['sens_holds']}/{n}] | {a['sens_tightness_path']:.3g} [{a['sens_path_holds']}/{n}] | "
                  f"{a['sens_bound_a1']:.4g} | {a['sens_tightness_a1']:.2g} | {a['infd']:.3g} | {a['infd_bound']:.3g} | "
                  f"{a['infd_tightness']:.3g} [{a['infd_holds']}/{n}] | {nb['infd']:.3g} | {nb['infd_bound']:.3g} | "
                  f"{nb['tightness']:.3g} |")
    if log.get("theorem_a1"):
        md += ["", "Theorem A.1, binary digits (digit >= 5, f = z_1 - z_0, logistic loss), seed 0, "
               f"{spec['a1']['examples']} test examples: measured adversarial loss (projected ascent, {spec['a1']['attack_steps']} "
               f"steps, {spec['a1']['restarts']} random restarts, no pixel clamping) vs loss + eps ||grad f||_* + eps^2/2 M "
               "(M = L_ball for L2, 64 L_ball for L-inf).", "",
               "| model | test acc | norm, eps | natural loss | adversarial loss | gradient term | Hessian term | RHS | "
               "RHS / adv | (RHS - nat) / (adv - nat) | holds |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for k, row in log["theorem_a1"].items():
            for norm in ("linf", "l2"):
                r = row[norm]
                md.append(f"| {k} | {row['test/acc']:.3f} | {norm}, {r['eps']} | {r['natural_loss']:.4g} | {r['adv_loss']:.4g} | "
                          f"{r['grad_term']:.4g} | {r['hess_term']:.4g} | {r['rhs']:.4g} | {r['rhs_over_adv']:.3g} | "
                          f"{r['excess_ratio']:.3g} | {r['holds']}/{r['n']} |")
    return "\n".join(md) + "\n"


EFFICIENCY_KEYS = {
    "sens": lambda r: r["eval"]["tables"]["global"]["Grad"]["sens_max"],
    "infd": lambda r: r["eval"]["tables"]["global"]["Grad"]["infd"],
    "acc": lambda r: r["metrics"]["test/acc"],
}


def method_table(tables: dict[str, dict]) -> list[str]:
    kinds = list(tables)
    methods = list(next(iter(tables.values()))["global"])
    md = ["| method | " + " | ".join(f"{k} SENS_max | {k} INFD" for k in kinds) + " |", "|---" * (1 + 2 * len(kinds)) + "|"]
    for m in methods:
        cells = [f"{tables[k]['global'][m]['sens_max']:.3g} | {tables[k]['global'][m]['infd']:.3g}" for k in kinds]
        md.append(f"| {m} | " + " | ".join(cells) + " |")
    return md


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--step-costs-only", action="store_true",
                        help="only (re)measure the per-step costs and merge them into the existing results")
    parser.add_argument("--val-drop", type=float, default=0.02, help="accuracy a penalty weight may cost on validation")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = "quick" if args.quick else "full"
    spec = SIZES[size]
    out = args.out or (Path("/tmp/saliency_robustifiers") if args.quick else Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    log = {"size": size, "spec": spec, "threads": args.threads, "val_drop": args.val_drop, "runs": []}

    def save():
        (out / "saliency_robustifiers.json").write_text(json.dumps(log, indent=2, default=list))
        if log["runs"]:
            (out / "saliency_robustifiers.md").write_text(summary_markdown(log))

    t_start = time.perf_counter()
    dm = DigitsDataModule(batch_size=128, seed=0)
    if args.step_costs_only:  # add the micro-benchmark to an existing run's results
        log = json.loads((out / "saliency_robustifiers.json").read_text())
        log["step_costs"] = step_costs(dm, log["weights"], log["spec"])
        save()
        print(json.dumps({k: round(v["ratio"], 2) for k, v in log["step_costs"].items()}), flush=True)
        return
    weights = select_weights(dm, spec, args.val_drop, log, save)
    log["weights"] = weights
    log["step_costs"] = step_costs(dm, weights, spec)
    for seed in spec["seeds"]:
        for kind in MODELS:  # interleaved, so slow drift of the shared machine hits every model alike
            model, metrics = train(dm, kind, weights.get(kind, 0.0), spec, seed)
            ev = evaluate(model, dm, spec, theory=seed == spec["seeds"][0])
            log["runs"].append({"kind": kind, "seed": seed, "weight": weights.get(kind, 0.0), "metrics": metrics, "eval": ev})
            g = ev["tables"]["global"]["Grad"]
            print(seed, kind, f"acc {metrics['test/acc']:.3f} pgd {metrics['test/pgd_acc']:.3f} "
                  f"train {metrics['train_seconds']:.1f}s sens {g['sens_max']:.3g} infd {g['infd']:.3g} "
                  f"eval {ev['eval_seconds']:.1f}s", flush=True)
            save()
    log["linear_control"] = linear_control(dm, spec)
    save()
    theorem_a1_study(weights, spec, log, save)
    log["total_seconds"] = time.perf_counter() - t_start
    save()
    print(f"done in {log['total_seconds']:.0f}s -> {out}", flush=True)


if __name__ == "__main__":
    main()
