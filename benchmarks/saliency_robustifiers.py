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

Controls beside the real scores: a bias-free linear model (constant Grad: local SENS_max 0, its global
SENS_max the x * Phi floor), the constant explanation Phi = 1 in every model's method table, the zero
explanation's INFD (INFD / INFD(0)); each robustifier minus regular is paired by seed (mean ± standard
error of the per-seed differences, a difference outside 2 SE only counts).

    python benchmarks/saliency_robustifiers.py           # benchmarks/results/saliency_robustifiers.{json,md}, ~11 min
    python benchmarks/saliency_robustifiers.py --quick   # seconds-long smoke run, to a temporary folder

It reports step timings: run it alone on its core (1 torch thread). Digits only: MNIST's CPU setting of
the Table 4 study does not fit a 2-core CPU budget.
"""

from __future__ import annotations

import math
import time

import lightning as L
import torch
from sklearn.datasets import load_digits

from ift import bench
from ift.data import DigitsDataModule
from ift.data.base import ImageTensorDataset, LoadedData
from ift.saliency import input_gradient_norm, input_hessian_norm
from ift.saliency.measures import noisy_baseline_perturbations
from ift.saliency.module import ClassifierModule, first_examples
from ift.saliency.report import SaliencyConfig, saliency_table
from ift.saliency.theory import class_score, gradient_bounds_a2, gradient_explainer, theorem_a1, theorem_c1

# What the results measure: the classifiers and their robustifiers, the explanations and measures, the
# bounds, the digits data and the Hessian-vector products of the probes and the Hessian regulariser.
SOURCES = ["src/ift/saliency", "src/ift/data/base.py", "src/ift/data/digits.py", "src/ift/implicit/operators.py"]
MODELS = ("regular", "pgd", "grad_norm", "hessian", "l2")
SIZES = {
    "full": dict(epochs=40, hidden=(64, 64), lr=3e-3, eps=0.1, step_size=0.025, steps=10, eval_steps=20, seeds=(0, 1, 2, 3, 4),
                 grids={"grad_norm": [0.03, 0.1, 0.3, 1.0], "hessian": [1.0, 3.0, 10.0, 30.0], "l2": [1e-3, 3e-3, 1e-2, 3e-2]},
                 examples=40, theory_examples=10, theory_pert=64, theory_steps=15, hess_points=16,
                 sal=dict(methods=("Grad", "Grad-SG", "IG", "Square", "NB", "Constant"), sens_samples=20, infd_samples=500,
                          sg_samples=30, nb_samples=3000, ig_steps=10, square_sizes=(1, 4), local=True,
                          sens_variants=("local", "global_clipped")),
                 a1=dict(examples=40, eps_linf=0.05, eps_l2=0.5, attack_steps=50, restarts=2)),
    "quick": dict(epochs=2, hidden=(16,), lr=3e-3, eps=0.1, step_size=0.05, steps=2, eval_steps=2, seeds=(0, 1),
                  grids={"grad_norm": [0.1, 1.0], "hessian": [0.1, 1.0], "l2": [1e-3, 1e-2]},
                  examples=4, theory_examples=2, theory_pert=8, theory_steps=2, hess_points=2,
                  sal=dict(methods=("Grad", "Square", "Constant"), sens_samples=2, infd_samples=20, sg_samples=2, nb_samples=100,
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
    with bench.Stopwatch() as clock:
        L.Trainer(max_epochs=spec["epochs"], limit_val_batches=0, **opts).fit(model, datamodule=dm)
    seconds = clock.wall
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
    """Milliseconds per training step (loss, backward, Adam) on one batch of 128: ``steps`` steps per
    call, the kinds interleaved in each of ``rounds`` rounds (``bench.interleaved``, one warm-up round);
    median [min, max] over rounds and the per-round ratio to the regular model. Lightning's per-step
    overhead (a few ms, the same for every kind) is left out: it dominates the wall-clock training
    time of a model this small."""
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    models = {k: make_model(dm, k, weights.get(k, 0.0), spec) for k in MODELS}
    opts = {k: torch.optim.Adam(m.parameters(), spec["lr"]) for k, m in models.items()}

    def steps_of(k):
        def fn():
            for _ in range(steps):
                opts[k].zero_grad()
                step_loss(models[k], k, x, y).backward()
                opts[k].step()
        return fn

    times = bench.interleaved({k: steps_of(k) for k in MODELS}, repeats=rounds)
    out = {}
    for k in MODELS:
        ratio = bench.ratio(times[k], times["regular"])
        out[k] = {"ms_per_step": 1e3 * times[k].median / steps, "ratio": ratio.median, "ratio_spread": ratio.to_dict(),
                  "ms_per_step_spread": spread_ms(times[k], steps), "rounds_ms": [1e3 * t / steps for t in times[k].wall]}
    return out


def spread_ms(timing: bench.Timing, steps: int) -> dict:
    return bench.Spread.of([1e3 * t / steps for t in timing.wall]).to_dict()


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


def seed_paired(by: dict, kind: str, f) -> tuple[float, float] | None:
    """``kind`` minus regular paired by seed (same initialisation and data order): mean and standard
    error of the per-seed differences of ``f(run)``."""
    reg = {r["seed"]: f(r) for r in by["regular"]}
    d = [f(r) - reg[r["seed"]] for r in by[kind] if r["seed"] in reg]
    if len(d) < 2:
        return None
    m, sd = stats(d)
    return m, sd / math.sqrt(len(d))


def paired_cell(p: tuple[float, float] | None, digits: int = 3) -> str:
    if p is None:
        return "-"
    m, se = p
    word = "tie" if not se > 0 or abs(m) <= 2 * se else ("lower" if m < 0 else "higher")
    return f"{m:+.{digits}g} ± {se:.2g} ({word})"


def summary_markdown(log: dict) -> str:
    runs, spec = log["runs"], log["spec"]
    kinds = [k for k in MODELS if any(r["kind"] == k for r in runs)]
    by = {k: [r for r in runs if r["kind"] == k] for k in kinds}
    seeds = sorted({r["seed"] for r in runs})
    md = [f"Digits (8x8, {log['size']} size), bias-free Softplus MLP {tuple(spec['hidden'])}, {spec['epochs']} epochs, Adam lr "
          f"{spec['lr']}; seeds {seeds}; mean ± sd over seeds. PGD accuracy: eps {spec['eps']}, {spec['eval_steps']} steps. "
          f"Penalty weights chosen on validation (seed 0): {log.get('weights')}. Explanations of the true-class logit on the "
          f"first {spec['examples']} test examples.", "",
          "Grad SENS_max is of the global x * Phi at y = x + delta; 'local' is SENS_max of Phi itself and 'clipped' the "
          "global one at y clipped to [0, 1], from the same deltas; the linear row is the floor of the global form "
          "(its Phi is constant); step cost: median [min, max] over interleaved rounds of the per-round ratio to "
          "regular.", ""]
    costs = log.get("step_costs", {})
    rows = []
    for k in kinds:
        rs = by[k]
        g, loc = [r["eval"]["tables"]["global"]["Grad"] for r in rs], [r["eval"]["tables"]["local"]["Grad"] for r in rs]
        cost = "-"
        if k in costs:
            sp = costs[k].get("ratio_spread")
            cost = (f"{sp['median']:.2f}x [{sp['min']:.2f}, {sp['max']:.2f}]" if sp else f"{costs[k]['ratio']:.2f}x")
        rows.append([k, f"{rs[0]['weight']:g}", fmt([r['metrics']['test/acc'] for r in rs]),
                     fmt([r['metrics']['test/pgd_acc'] for r in rs]), fmt([r['metrics']['train_seconds'] for r in rs]),
                     cost, fmt([m['sens_max'] for m in g]), fmt([m.get('sens_max_local_input', math.nan) for m in g]),
                     fmt([m.get('sens_max_global_clipped_input', math.nan) for m in g]), fmt([m['infd'] for m in g]),
                     fmt([m['infd_rel'] for m in g]), fmt([m['infd'] for m in loc]),
                     fmt([r['eval']['probes']['grad_norm'] for r in rs]), fmt([r['eval']['probes']['hessian_norm'] for r in rs])])
    lin = log.get("linear_control")
    if lin:
        g = lin["Grad"]
        rows.append(["linear (control, bias-free)", "-", f"{lin['test/acc']:.3f}", "-", "-", "-", f"{g['sens_max']:.3g}",
                     f"{g.get('sens_max_local_input', math.nan):.3g}", f"{g.get('sens_max_global_clipped_input', math.nan):.3g}",
                     f"{g['infd']:.3g}", f"{g['infd_rel']:.3g}", "-", "-", "0"])
    const = [r["eval"]["tables"]["global"].get("Constant") for r in by.get("regular", [])]
    if const and all(const):
        rows.append(["constant explanation Phi = 1 (control; regular model)", "-", "-", "-", "-", "-",
                     fmt([c["sens_max"] for c in const]), fmt([c.get("sens_max_local_input", math.nan) for c in const]),
                     fmt([c.get("sens_max_global_clipped_input", math.nan) for c in const]),
                     fmt([c["infd"] for c in const]), fmt([c["infd_rel"] for c in const]), "-", "-", "-"])
    md.append(bench.table(["model", "weight", "test acc", "test PGD acc", "train s (1 thread)", "step cost (ratio)",
                           "Grad SENS_max", "Grad SENS_max local", "Grad SENS_max clipped", "Grad INFD (global)",
                           "Grad INFD/INFD(0)", "Grad INFD (local)", "mean grad norm", "mean Hessian norm"], rows))
    if "regular" in by and len(seeds) > 1:
        md += ["Each model minus regular, paired by seed (mean ± standard error of the per-seed differences over "
               f"{len(seeds)} seeds; outside 2 SE: lower / higher, else a tie), Grad:", ""]
        keys = {"SENS_max (global)": lambda r: r["eval"]["tables"]["global"]["Grad"]["sens_max"],
                "SENS_max local": lambda r: r["eval"]["tables"]["global"]["Grad"].get("sens_max_local_input", math.nan),
                "SENS_max clipped": lambda r: r["eval"]["tables"]["global"]["Grad"].get("sens_max_global_clipped_input",
                                                                                      math.nan),
                "INFD (global)": lambda r: r["eval"]["tables"]["global"]["Grad"]["infd"],
                "INFD/INFD(0)": lambda r: r["eval"]["tables"]["global"]["Grad"]["infd_rel"],
                "test acc": lambda r: r["metrics"]["test/acc"]}
        rows = [[k, *(paired_cell(seed_paired(by, k, f)) for f in keys.values())] for k in kinds if k != "regular"]
        md.append(bench.table(["model", *keys], rows))
    if "regular" in by:
        md += ["Per unit of accuracy and compute (Grad, means over seeds, relative to regular): drop in SENS_max and in "
               "global INFD (in % of the regular model's), per accuracy point lost and per unit of extra compute "
               "(step cost - 1, the micro-benchmark's median ratio). Accuracy points lost ± 2 standard errors of the "
               "difference of the seed means; 'n/a' where the loss is within that noise.", ""]
        base = {key: stats([f(r) for r in by["regular"]])[0] for key, f in EFFICIENCY_KEYS.items()}
        rows = []
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
            rows.append([k, f"{ds:.1f}", f"{di:.1f}", f"{acc_lost:.2f} ± {2 * se:.2f}", f"{extra:.2f}",
                         per(ds, acc_lost, 2 * se), per(di, acc_lost, 2 * se), per(ds, extra, 0.05), per(di, extra, 0.05)])
        md.append(bench.table(["model", "SENS_max drop %", "INFD drop %", "acc points lost", "extra compute",
                               "SENS drop % / acc pt", "INFD drop % / acc pt", "SENS drop % / extra compute",
                               "INFD drop % / extra compute"], rows))
    md += ["Table 4 setting per model (x * Phi under square removal; NB local), seed 0; Constant is the control "
           "Phi = 1:", ""]
    md += [method_table({k: by[k][0]["eval"]["tables"] for k in kinds})]
    md += ["Theorem C.1 (Grad, noisy-baseline I, fixed 64 samples, ||u||_inf <= 0.1; seed 0, mean over examples): "
           "RINFD >= (max(0, A - B(x) - B(x - I)) / 2)^2.", ""]
    rows = []
    for k in kinds:
        t = by[k][0]["eval"]["theory"]
        c = t["c1"]
        rows.append([k, f"{c['rinfd']:.4g}", f"{c['infd']:.4g}", f"{c['A']:.4g}", f"{c['B']:.4g}", f"{c['B_shift']:.4g}",
                     f"{c['bound']:.3g}", f"{t['c1_holds']}/{t['n']}", f"{t['c1_nontrivial']}/{t['n']}"])
    md.append(bench.table(["model", "RINFD", "INFD (u = 0)", "A", "B(x)", "B(x - I)", "bound", "holds", "bound > 0"], rows))
    md += ["A.2 for Grad (seed 0, mean over examples; L-inf ball r = 0.1, its L2 radius R = r sqrt(64) = 0.8): "
           "SENS = max ||grad f(x+u) - grad f(x)||_2 by ascent vs L_ball R (L_ball: largest Hessian spectral norm over x "
           "and 16 sampled ball points), vs L_path r* (largest Hessian norm on 20 points of the segment from x to the "
           "ascent's maximiser u*, r* = ||u*||_2: the mean value theorem) and vs Proposition A.1's certified L_A1 R; INFD "
           "(unscaled) of I uniform in the same ball vs mean L_I^2 ||I||^4 / 4, and of the noisy-baseline I.", ""]
    rows = []
    for k in kinds:
        t = by[k][0]["eval"]["theory"]
        a, nb = t["a2"], t["a2_infd_noisy_baseline"]
        n = t["n"]
        rows.append([k, f"{a['sens_ascent']:.4g}", f"{a['sens_mc']:.4g}", f"{a['sens_bound']:.4g}",
                     f"{a['sens_tightness']:.3g} [{a['sens_holds']}/{n}]",
                     f"{a['sens_tightness_path']:.3g} [{a['sens_path_holds']}/{n}]", f"{a['sens_bound_a1']:.4g}",
                     f"{a['sens_tightness_a1']:.2g}", f"{a['infd']:.3g}", f"{a['infd_bound']:.3g}",
                     f"{a['infd_tightness']:.3g} [{a['infd_holds']}/{n}]", f"{nb['infd']:.3g}", f"{nb['infd_bound']:.3g}",
                     f"{nb['tightness']:.3g}"])
    md.append(bench.table(["model", "SENS ascent", "SENS MC", "L_ball R", "SENS / (L_ball R) [holds]",
                           "SENS / (L_path r*) [holds]", "L_A1 R", "SENS / (L_A1 R)", "INFD local I", "bound",
                           "INFD / bound [holds]", "INFD NB I", "bound", "INFD / bound"], rows))
    if log.get("theorem_a1"):
        md += ["Theorem A.1, binary digits (digit >= 5, f = z_1 - z_0, logistic loss), seed 0, "
               f"{spec['a1']['examples']} test examples: measured adversarial loss (projected ascent, {spec['a1']['attack_steps']} "
               f"steps, {spec['a1']['restarts']} random restarts, no pixel clamping) vs loss + eps ||grad f||_* + eps^2/2 M "
               "(M = L_ball for L2, 64 L_ball for L-inf).", ""]
        rows = []
        for k, row in log["theorem_a1"].items():
            for norm in ("linf", "l2"):
                r = row[norm]
                rows.append([k, f"{row['test/acc']:.3f}", f"{norm}, {r['eps']}", f"{r['natural_loss']:.4g}",
                             f"{r['adv_loss']:.4g}", f"{r['grad_term']:.4g}", f"{r['hess_term']:.4g}", f"{r['rhs']:.4g}",
                             f"{r['rhs_over_adv']:.3g}", f"{r['excess_ratio']:.3g}", f"{r['holds']}/{r['n']}"])
        md.append(bench.table(["model", "test acc", "norm, eps", "natural loss", "adversarial loss", "gradient term",
                               "Hessian term", "RHS", "RHS / adv", "(RHS - nat) / (adv - nat)", "holds"], rows))
    return "\n".join(md) + "\n"


EFFICIENCY_KEYS = {
    "sens": lambda r: r["eval"]["tables"]["global"]["Grad"]["sens_max"],
    "infd": lambda r: r["eval"]["tables"]["global"]["Grad"]["infd"],
    "acc": lambda r: r["metrics"]["test/acc"],
}


def method_table(tables: dict[str, dict]) -> str:
    kinds = list(tables)
    methods = list(next(iter(tables.values()))["global"])
    rows = [[m, *(c for k in kinds for c in (f"{tables[k]['global'][m]['sens_max']:.3g}",
                                             f"{tables[k]['global'][m]['infd']:.3g}",
                                             f"{tables[k]['global'][m]['infd_rel']:.3g}"))] for m in methods]
    return bench.table(["method", *(h for k in kinds for h in (f"{k} SENS_max", f"{k} INFD", f"{k} INFD/INFD(0)"))], rows)


def main() -> None:
    parser = bench.parser(__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--val-drop", type=float, default=0.02, help="accuracy a penalty weight may cost on validation")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = "quick" if args.quick else "full"
    spec = SIZES[size]
    run = bench.Run("saliency_robustifiers", SOURCES, args)
    log = {"size": size, "spec": spec, "threads": args.threads, "val_drop": args.val_drop, "runs": []}

    def save():
        run.write(log, summary_markdown(log) if log["runs"] else None)

    t_start = time.perf_counter()
    dm = DigitsDataModule(batch_size=128, seed=0)
    weights = select_weights(dm, spec, args.val_drop, log, save)
    log["weights"] = weights
    log["step_costs"] = step_costs(dm, weights, spec, rounds=2 if args.quick else 7, steps=2 if args.quick else 20)
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
    print(f"done in {log['total_seconds']:.0f}s", flush=True)


if __name__ == "__main__":
    main()
