"""Yeh et al. 2019 on CPU: regular vs PGD-trained classifiers, SENS_max / INFD of every explanation
(Table 4), Grad-SG vs smoothing radius (Figure 6), the toy function of Appendix A.5 (Figure 5) and
the Proposition A.1 bound check.

    python benchmarks/saliency_study.py --setting digits   # toy, Prop. A.1, 8x8 digits (~20 min on a shared core)
    python benchmarks/saliency_study.py --setting cpu      # full MNIST, what fits 2 CPU cores (~2 h + training)
    python benchmarks/saliency_study.py --setting paper    # full MNIST at the paper's sizes (GPU)
    python benchmarks/saliency_study.py --quick            # seconds-long digits smoke run, to a temporary folder
    python benchmarks/saliency_study.py --setting cpu --quick   # minutes-long smoke run of the MNIST pipeline

The MNIST settings (SETTINGS) train the regular and the PGD-trained Madry CNN on the official 60k
training images (5k of them held out for validation) and save the pair under --checkpoints, with a
training log (``saliency_<setting>_<label>.json``, provenance and the sha256 of the weights) and a
weights-only file (``*.weights.pt``, the part worth keeping); ``--phase explain`` reruns the
explanation study from the saved pair. Results go to --out (default benchmarks/results):
saliency_{table4,fig6,verify}_mnist_<setting>.* and the maps, rewritten after every step.
Every control (a linear model, the constant explanation Phi = 1, the zero explanation of INFD) and
the Quantus cross-check (when quantus is installed) sit beside the real scores.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from ift import bench
from ift.data import DigitsDataModule
from ift.saliency import (build_network, gradient, guided_backprop, infidelity, input_gradient_norm, input_hessian_norm,
                          max_sensitivity, pgd_attack, smooth, softplus_gradient_lipschitz)
from ift.saliency.module import ClassifierModule, first_examples
from ift.saliency.pgd import fgsm_rs_attack
from ift.saliency.explanations import METHODS, make_explanation, to_global
from ift.saliency.measures import max_sensitivities
from ift.saliency.report import (SaliencyConfig, evaluate_method, infidelity_cache, saliency_table,
                                 save_maps_png, sem)

# What the results measure: the saliency package (explanations, measures, networks, PGD, report), the
# data loaders it reads and the Hessian-vector products of the probes.
SOURCES = ["src/ift/saliency", "src/ift/data/base.py", "src/ift/data/digits.py", "src/ift/data/idx.py",
           "src/ift/implicit/operators.py"]

PAPER_TABLE4 = {  # MNIST, regular / robust: (SENS_max, INFD), global explanations (Table 4)
    "Grad": ((2.32, 2.42), (0.21, 0.36)), "Grad-SG": ((1.82, 1.88), (0.13, 0.35)),
    "IG": ((2.05, 1.78), (0.16, 0.21)), "IG-SG": ((1.69, 1.77), (0.11, 0.2)),
    "GBP": ((2.36, 2.42), (0.21, 0.36)), "GBP-SG": ((1.83, 1.82), (0.13, 0.35)),
    "SHAP": ((0.35, 1.20), (0.23, 0.14)), "Square": ((0.24, 0.46), (0.11, 0.06)),
}

DIGITS_METHODS = (*METHODS, "Constant")
SIZES = {
    # 50 test examples for every INFD and for the SENS of every cheap method; SmoothGrad at the paper's
    # 200 samples; the SENS of the costly methods on fewer examples x draws (IG-SG: 10 x 5, each draw 2000
    # gradients; SHAP / Square / NB: 20 x 10, each draw a full solve), the -SG rows in fewer SENS forms:
    # at 20 draws for everything IG-SG alone took ~30 min per model on a shared core
    "full": {
        "digits": dict(epochs=10, width=1.0, eps=0.1, step_size=0.025, steps=10, examples=50,
                       sal=dict(methods=DIGITS_METHODS, sens_samples=20, sens_normalize=("input", "unit"),
                                infd_samples=1000, sg_samples=200, shap_samples=1000, nb_samples=5000, ig_steps=10,
                                square_sizes=(1, 4), local=True, per_example=True,
                                sens_variants=("local", "global_clipped", "local_clipped"),
                                method_sens={"Grad-SG": {"variants": ["local"]}, "GBP-SG": {"variants": []},
                                             "IG-SG": {"examples": 10, "samples": 5, "variants": []},
                                             "SHAP": {"examples": 20, "samples": 10},
                                             "Square": {"examples": 20, "samples": 10},
                                             "NB": {"examples": 20, "samples": 10}})),
        "fig6_radii": [0.1, 0.2, 0.5, 1.0, 1.5, 2.0],
        "fig5": dict(sg_samples=20000, near=200, near_sg=40),
        "prop_a1": dict(epochs=10, examples=20, samples=200, radii=(0.01, 0.05, 0.1, 0.2, 0.5)),
    },
    "quick": {
        "digits": dict(epochs=1, width=0.5, eps=0.1, step_size=0.05, steps=2, examples=3,
                       sal=dict(methods=("Grad", "Grad-SG", "Square", "Constant"), sens_samples=2,
                                sens_normalize=("input", "unit"), infd_samples=20, sg_samples=2, shap_samples=20,
                                nb_samples=50, ig_steps=2, square_sizes=(1, 2), local=True, per_example=True,
                                sens_variants=("local", "global_clipped"), method_sens={"Square": {"examples": 2}})),
        "fig6_radii": [0.5],
        "fig5": dict(sg_samples=200, near=5, near_sg=2),
        "prop_a1": dict(epochs=1, examples=3, samples=3, radii=(0.1,)),
    },
}


def weights_record(path: Path, state_dict: dict) -> dict:
    """Size and sha256 of a saved weights file, and a sha256 of the tensors themselves (names, dtypes,
    shapes, bytes in state-dict order; independent of torch's file format), so a later session can
    tell whether a kept or retrained file holds the same weights."""
    h = hashlib.sha256()
    for name, t in state_dict.items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "tensors_sha256": h.hexdigest(), "parameters": int(sum(t.numel() for t in state_dict.values()))}


def train(datamodule, pgd: bool, spec: dict, seed: int = 0) -> tuple[ClassifierModule, dict]:
    L.seed_everything(seed, workers=True)
    model = ClassifierModule(datamodule.shape, datamodule.num_classes, width=spec["width"], pgd=pgd, lr=1e-3,
                             eps=spec["eps"], step_size=spec["step_size"], steps=spec["steps"])
    trainer = L.Trainer(max_epochs=spec["epochs"], accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    metrics = trainer.test(model, datamodule=datamodule, verbose=False)[0]
    metrics["train_seconds"] = time.perf_counter() - t0
    return model.eval(), {k: float(v) for k, v in metrics.items()}


def probes(model, x, y) -> dict[str, float]:
    """Mean input-gradient norm of the logit and Hessian spectral norm of the log-probability
    (a ReLU net's logit has zero Hessian almost everywhere)."""
    logit = lambda z: model(z).gather(1, y.view(-1, 1)).squeeze(1)
    logp = lambda z: torch.log_softmax(model(z), 1).gather(1, y.view(-1, 1)).squeeze(1)
    return {"grad_norm_logit": float(input_gradient_norm(logit, x).mean()),
            "hessian_norm_logprob": float(input_hessian_norm(logp, x, iters=30,
                                                             generator=torch.Generator().manual_seed(0)).mean())}


def train_linear_control(datamodule, epochs: int, seed: int = 0) -> tuple[nn.Module, float]:
    """The SENS-floor control on digits: a bias-free linear classifier (the Softplus MLP without hidden
    layers). Its gradient is constant, so its local SENS_max is 0 and its global one is the x * Phi floor."""
    L.seed_everything(seed, workers=True)
    model = ClassifierModule(datamodule.shape, datamodule.num_classes, arch="softplus_mlp", hidden=(), lr=1e-2,
                             eval_pgd=False)
    opts = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0)
    L.Trainer(max_epochs=epochs, **opts).fit(model, datamodule=datamodule)
    acc = float(L.Trainer(**opts).test(model, datamodule=datamodule, verbose=False)[0]["test/acc"])
    return model.net.eval(), acc


def table4(name: str, datamodule, spec: dict, out: Path, new_run, quantus: bool = True) -> dict:
    """Regular vs PGD-trained model on the same test examples: every method (and the Constant control)
    with per-example values for paired standard errors, the linear-model control, Quantus beside ours."""
    run = new_run(f"saliency_table4_{name}")
    models, results = {}, {}
    cfg = SaliencyConfig(**spec["sal"])
    x, y = first_examples(datamodule, spec["examples"])
    maps_files = []
    for label, pgd in (("regular", False), ("robust", True)):
        model, metrics = train(datamodule, pgd, spec)
        models[label] = model
        t0 = time.perf_counter()
        tables, maps = saliency_table(model.net, x, y, cfg)
        maps_files.append(f"saliency_maps_{name}_{label}.png")
        save_maps_png(x, {m: v for m, v in maps.items() if m != "Constant"}, out / maps_files[-1])
        results[label] = {"accuracy": metrics, "probes": probes(model.net, x, y), "tables": tables,
                          "saliency_seconds": time.perf_counter() - t0, "arch": model.arch,
                          "attack": model.attack}
        if quantus:
            try:
                results[label]["quantus"] = quantus_rows(model.net, x, y, tables["global"]["Grad"], cfg.sens_radius,
                                                         cfg.sens_samples, patch=max(1, x.shape[-1] // 2))
            except ImportError as err:
                log(f"no Quantus cross-check: {err}")
        log(f"{name} {label}: {metrics}, {results[label]['probes']}, {results[label]['saliency_seconds']:.0f}s")
    lin, lin_acc = train_linear_control(datamodule, spec["epochs"])
    lin_cfg = replace(cfg, methods=("Grad",))
    lin_tables, _ = saliency_table(lin, x, y, lin_cfg)
    results["linear"] = {"test_acc": lin_acc, "tables": lin_tables}
    log(f"{name} linear control: test acc {lin_acc:.3f}, " + short(lin_tables["global"]["Grad"]))
    sizes = {k: v for k, v in spec.items() if k != "sal"} | {"sal": asdict(cfg)}
    run.write({"sizes": sizes, "results": results}, table4_markdown(name, results, sizes), files=maps_files)
    return models


def table4_markdown(name: str, results: dict, sizes: dict) -> str:
    reg, rob, lin = results["regular"], results["robust"], results.get("linear")
    sal = sizes["sal"]
    md = [f"### {name}: regular vs PGD-trained ({reg['arch']}, PGD eps {rob['attack']['eps']}, "
          f"{sizes['examples']} test examples)", ""]
    rows = [[label, f"{r['accuracy']['test/acc']:.3f}", f"{r['accuracy']['test/pgd_acc']:.3f}",
             f"{r['probes']['grad_norm_logit']:.3g}", f"{r['probes']['hessian_norm_logprob']:.3g}"]
            for label, r in (("regular", reg), ("robust", rob))]
    if lin:
        rows.append(["linear (control, bias-free)", f"{lin['test_acc']:.3f}", "-", "-", "0"])
    md += [bench.table(["model", "test acc", "test PGD acc", "mean grad norm (logit)",
                        "mean Hessian norm (log-prob)"], rows)]
    md += [f"Counts: {sizes['examples']} test examples for every INFD and for the SENS of every method unless the "
           f"'SENS examples x samples' column says fewer; SENS radius {sal['sens_radius']}; SmoothGrad radius "
           f"{sal['sg_radius']}, {sal['sg_samples']} samples; IG {sal['ig_steps']} steps; SHAP {sal['shap_samples']} "
           f"samples; NB {sal['nb_samples']} samples; square removal over every square of side "
           f"{sal['square_sizes'][0]}..{sal['square_sizes'][1]}; noisy baseline {sal['infd_samples']} draws. Cells: "
           "mean ± standard error over images; 'robust - regular': mean ± standard error of the per-image "
           "differences (same images, same perturbation draws), outside 2 SE called lower / higher, else a tie. "
           "Controls: 'Constant' is Phi = 1 (ignores the model: local SENS_max 0, global x * Phi = x moves by "
           "delta only); the linear model's Grad is constant (its global SENS_max is the floor of x * Phi); the "
           "zero explanation's INFD is E[df^2].", ""]
    for setting in reg["tables"]:
        t_reg, t_rob = reg["tables"][setting], rob["tables"][setting]
        norms = [n for n in ("input", "unit") if f"sens_max_{n}" in next(iter(t_reg.values()))]
        forms = ["", "global_clipped_", "local_", "local_clipped_"] if setting == "global" else [""]
        title = {"global": "global x * Phi, square removal (NB: noisy baseline)", "local": "local Phi, noisy baseline"}
        md += [f"**{setting}** ({title.get(setting, setting)})", ""]
        for n in norms:
            present = [f for f in forms if any(f"sens_max_{f}{n}" in m for m in t_reg.values())]
            head = ["Method", "SENS examples x samples"]
            for f in present:
                t = FORM_TITLES.get(f, f) if setting == "global" else "local Phi"
                head += [f"SENS_max {n}, {t}: regular", "robust", "robust - regular"]
            rows = []
            for m in t_reg:
                a, b = t_reg[m], t_rob.get(m)
                row = [m, f"{a['sens_examples']} x {a['sens_samples']}"]
                for f in present:
                    key = f"sens_max_{f}{n}"
                    row += [cell(a, key), cell(b, key), verdict(paired(a, b, key))]
                rows.append(row)
            lin_grad = lin and lin["tables"].get(setting, {}).get("Grad")
            if lin_grad:
                row = ["linear model Grad (control)", f"{lin_grad['sens_examples']} x {lin_grad['sens_samples']}"]
                for f in present:
                    row += [cell(lin_grad, f"sens_max_{f}{n}"), "-", "-"]
                rows.append(row)
            md += [bench.table(head, rows)]
        rows = []
        for m in t_reg:
            a, b = t_reg[m], t_rob.get(m)
            rows.append([m, a["perturbation"], cell(a, "infd"), cell(b, "infd"), verdict(paired(a, b, "infd")),
                         cell(a, "infd_rel"), cell(b, "infd_rel"), verdict(paired(a, b, "infd_rel"))])
        for pert in dict.fromkeys(m["perturbation"] for m in t_reg.values()):
            a = next(m for m in t_reg.values() if m["perturbation"] == pert)
            b = next(m for m in t_rob.values() if m["perturbation"] == pert)
            rows.append([f"zero explanation (E[df^2])", pert, cell(a, "infd_zero") if "infd_zero_sem" in a else
                         f"{a['infd_zero']:.3g}", cell(b, "infd_zero") if "infd_zero_sem" in b else
                         f"{b['infd_zero']:.3g}", verdict(paired(a, b, "infd_zero")), "1", "1", "-"])
        md += [bench.table(["Method", "perturbation", "INFD regular", "INFD robust", "robust - regular",
                            "INFD/INFD(0) regular", "robust", "robust - regular"], rows)]
    md += quantus_markdown({"regular": reg, "robust": rob})
    return "\n".join(md) + "\n"


def quantus_markdown(models: dict) -> list[str]:
    rows = []
    for label, r in models.items():
        for part, title in (("sens_max", "MaxSensitivity (input norm., global Grad, own draws)"),
                            ("infidelity", "Infidelity (black squares, no scaling, its perturbations)")):
            c = r.get("quantus", {}).get(part)
            if c:
                rows.append([label, title, f"{c['ours']:.4g} ± {c['ours_se']:.2g}",
                             f"{c['quantus']:.4g} ± {c['quantus_se']:.2g}", f"{c['ours'] - c['quantus']:+.2g} ± {c['se']:.2g}",
                             "yes" if c["agree_3se"] else "no"])
    if not rows:
        return []
    return ["**Cross-check with Quantus 0.6** (Grad; agreement = |ours - Quantus| within 3 SE of the per-image "
            "difference)", "", bench.table(["model", "metric", "ours", "Quantus", "ours - Quantus", "agree"], rows)]


def figure6(model, datamodule, radii, spec: dict, out: Path, name: str, new_run) -> None:
    """INFD (local, noisy baseline) and SENS_max of Grad-SG as the SmoothGrad radius grows."""
    run = new_run(f"saliency_fig6_{name}")
    x, y = first_examples(datamodule, spec["examples"])
    sal = spec["sal"]
    rows = []
    for r in [0.0, *radii]:
        expl = gradient(model.net)
        if r > 0:
            expl = smooth(expl, r, sal["sg_samples"], generator=torch.Generator().manual_seed(0))
        phi = expl(x, y)
        infd = infidelity(model.net, x, phi, "noisy_baseline", sal["infd_samples"], y,
                          generator=torch.Generator().manual_seed(1))
        sens = max_sensitivity(expl, x, 0.1, sal["sens_samples"], y, generator=torch.Generator().manual_seed(2))
        rows.append({"radius": r, "infd": float(infd.mean()), "infd_sem": sem(infd), "sens_max": float(sens.mean()),
                     "sens_max_sem": sem(sens)})
        log(f"fig6 {rows[-1]}")
    md = (f"Local Grad-SG on the regular {name} model, {len(x)} test examples, {sal['sg_samples']} SmoothGrad samples, "
          f"{sal['sens_samples']} SENS samples (radius 0.1, input normalisation), {sal['infd_samples']} noisy-baseline "
          "INFD draws; mean ± standard error.\n\n"
          + bench.table(["SG radius (0 = Grad)", "INFD (noisy baseline)", "SENS_max (r = 0.1)"],
                        [[r["radius"], f"{r['infd']:.4g} ± {r['infd_sem']:.2g}",
                          f"{r['sens_max']:.4g} ± {r['sens_max_sem']:.2g}"] for r in rows]))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.errorbar([r["radius"] for r in rows], [r["infd"] for r in rows], [r["infd_sem"] for r in rows], fmt="o-",
                label="INFD")
    ax.errorbar([r["radius"] for r in rows], [r["sens_max"] for r in rows], [r["sens_max_sem"] for r in rows],
                fmt="s-", label="SENS_max")
    ax.set_xlabel("SmoothGrad radius")
    ax.legend()
    fig.tight_layout()
    run.write({"sizes": {"examples": len(x), **{k: sal[k] for k in ("sg_samples", "sens_samples", "infd_samples")}},
               "rows": rows}, md, figures={f"saliency_fig6_{name}.png": fig})
    plt.close(fig)


def toy_f(p: torch.Tensor) -> torch.Tensor:
    """Appendix A.5: with k = floor(|a - b|), f = max(a, b) - k/2 for even k, min(a, b) + (k+1)/2 for odd k."""
    a, b = p[..., 0], p[..., 1]
    k = torch.floor((a - b).abs())
    even = torch.remainder(k, 2) == 0
    return torch.where(even, torch.maximum(a, b) - k / 2, torch.minimum(a, b) + (k + 1) / 2)


def figure5(out: Path, spec: dict, new_run) -> None:
    run = new_run("saliency_fig5_toy")

    def grad(p):
        p = p.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(toy_f(p).sum(), p)
        return g

    pts = torch.tensor([[20.0, 11.9], [20.0, 12.1], [20.0, 15.9]], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    sg_radius = 10.0
    deltas = (torch.rand(spec["sg_samples"], 1, 2, generator=g, dtype=torch.float64) * 2 - 1) * sg_radius
    sg = torch.stack([grad(p + deltas).mean(0).squeeze(0) for p in pts.unsqueeze(1)])
    # SENS_max (r = 0.25, raw L2) of Grad and Grad-SG at (20, 11.9)
    near = pts[0] + (torch.rand(spec["near"], 2, generator=g, dtype=torch.float64) * 2 - 1) * 0.25
    sens_grad = float((grad(near) - grad(pts[:1])).norm(dim=1).max())
    sg_near = torch.stack([grad(q + deltas.squeeze(1)).mean(0) for q in near[:spec["near_sg"]]])
    sens_sg = float((sg_near - sg[0]).norm(dim=1).max())
    result = {"f": toy_f(pts).tolist(), "grad": grad(pts).tolist(), "grad_sg": sg.tolist(), "sg_radius": sg_radius,
              "sizes": spec, "sens_max_grad_r0.25": sens_grad, "sens_max_grad_sg_r0.25": sens_sg,
              "paper": {"f": [16, 16.1, 18], "grad": [[1, 0], [0, 1], [1, 0]], "grad_sg": "about (0.5, 0.5)"}}
    rows = [[str(tuple(p)), f"{fv:.3g}", str(tuple(round(v, 3) for v in gr)), str(tuple(round(v, 3) for v in s))]
            for p, fv, gr, s in zip(pts.tolist(), result["f"], result["grad"], result["grad_sg"])]
    md = (f"Appendix A.5 toy function; Grad-SG from {spec['sg_samples']} uniform draws in the L-inf ball of radius "
          f"{sg_radius}.\n\n" + bench.table(["point", "f", "Grad", "Grad-SG (uniform L-inf, radius 10)"], rows)
          + f"\nSENS_max at (20, 11.9), radius 0.25 (raw L2; Grad over {spec['near']} draws, Grad-SG over "
          f"{spec['near_sg']}): Grad {sens_grad:.3g}, Grad-SG {sens_sg:.3g}\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = torch.meshgrid(torch.linspace(10, 25, 300, dtype=torch.float64),
                          torch.linspace(5, 20, 300, dtype=torch.float64), indexing="xy")
    grid = torch.stack([a, b], -1)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    axes[0].imshow(grad(grid.view(-1, 2))[:, 0].view(300, 300), origin="lower", extent=(10, 25, 5, 20), cmap="bwr")
    axes[0].set_title("d f / d a (blue 0 = gradient (0,1), red 1 = (1,0))", fontsize=8)
    axes[0].plot([20, 20, 20], [11.9, 12.1, 15.9], "k.")
    im = axes[1].imshow(toy_f(grid), origin="lower", extent=(10, 25, 5, 20))
    axes[1].set_title("f(a, b)", fontsize=8)
    fig.colorbar(im, ax=axes[1])
    for ax in axes:
        ax.set_xlabel("a")
        ax.set_ylabel("b")
    fig.tight_layout()
    run.write(result, md, figures={"saliency_fig5_toy.png": fig})
    plt.close(fig)


def proposition_a1(datamodule, out: Path, spec: dict, new_run) -> None:
    """Measured SENS_max (raw L2, max over MC samples) of a bias-free Softplus MLP's gradient vs the
    bound L * r * sqrt(d) (L: Lipschitz constant of the gradient from the weights; ||d||_2 <= r sqrt(d))."""
    run = new_run("saliency_prop_a1")
    L.seed_everything(0)
    model = ClassifierModule(datamodule.shape, datamodule.num_classes, arch="softplus_mlp", hidden=(32, 32),
                             eval_pgd=False)
    trainer = L.Trainer(max_epochs=spec["epochs"], accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=datamodule)
    net = model.net.double().eval()
    x, y = first_examples(datamodule, spec["examples"])
    x = x.double()
    d = x[0].numel()
    bound_l = softplus_gradient_lipschitz(net.weights())
    bound_l_fro = softplus_gradient_lipschitz(net.weights(), "fro")

    def grad(z, t):
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(net(z).gather(1, t.view(-1, 1)).sum(), z)
        return g

    rows = []
    for r in spec["radii"]:
        sens = max_sensitivity(grad, x, r, spec["samples"], y, normalize="none",
                               generator=torch.Generator().manual_seed(0))
        rows.append({"radius": r, "sens_max_mean": float(sens.mean()), "sens_max_max": float(sens.max()),
                     "bound_spectral": bound_l * r * math.sqrt(d), "bound_fro": bound_l_fro * r * math.sqrt(d),
                     "holds": int((sens <= bound_l * r * math.sqrt(d)).sum()), "n": len(x)})
        log(f"propA1 {rows[-1]}")
    md = (f"Bias-free Softplus MLP (32, 32) on digits, {spec['epochs']} epochs; SENS_max (raw L2) of Grad over "
          f"{spec['samples']} draws on {len(x)} test examples vs L r sqrt(d), d = {d}.\n\n"
          + bench.table(["radius r", f"measured SENS_max (mean / max over {len(x)} examples)",
                         "bound L r sqrt(d), spectral", "Frobenius", "holds (spectral)"],
                        [[r["radius"], f"{r['sens_max_mean']:.3g} / {r['sens_max_max']:.3g}", f"{r['bound_spectral']:.3g}",
                          f"{r['bound_fro']:.3g}", f"{r['holds']}/{r['n']}"] for r in rows]))
    run.write({"lipschitz_spectral": bound_l, "lipschitz_fro": bound_l_fro, "d": d, "sizes": spec, "rows": rows}, md)


# ----------------------------------------------------------------------------- full MNIST (Table 4 setting)
SENS_REPORTED = ("input", "unit", "none", "input_2019")  # from the same samples; see measures.max_sensitivity
SETTINGS = {
    # what fits on 2 CPU cores in about 2 hours, run with 1 torch thread
    # stage 1 of the cpu robust model: from random initialisation, FGSM with random start (Wong et al.
    # 2020: step 1.25 eps, cyclic lr), ~200 s per epoch; alone it holds 0.48 under PGD-100 x 10 restarts
    "cpu_fgsm": dict(width=1.0, batch=100, lr=1e-3, natural_epochs=3, robust_epochs=8, robust_attack="fgsm_rs",
                     fgsm_step=0.375, robust_lr=5e-3, schedule="cyclic", eps=0.3, steps=7, step_size=0.01,
                     eps_warmup_epochs=1.0, val_size=5000, val_pgd_examples=1000, val_pgd_steps=20),
    # stage 2: the stage-1 model trained on for 2 epochs with PGD-10 x 0.075 (Madry's 2.5 eps / steps), lr 5e-4 then
    # 5e-5 in the last epoch; never trained on natural images
    "cpu": dict(width=1.0, batch=100, lr=1e-3, robust_lr=5e-4, natural_epochs=3, robust_epochs=2, robust_attack="pgd",
                robust_init="setting:cpu_fgsm", eps=0.3, steps=10, train_step_size=0.075, step_size=0.01,
                eps_warmup_epochs=0.0, val_size=5000, val_pgd_examples=500, val_pgd_steps=40,
                test_pgd=dict(examples=2000, steps=40, step_size=0.01), examples=50,
                verify=dict(examples=500, eps=0.3, steps=100, restarts=10, step_sizes=[0.01, 0.05],
                            square_queries=1000, square_examples=200, curve=dict(examples=500, steps=50,
                                                            radii=[0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5])),
                # SmoothGrad at the paper's 200 samples; its SENS max is over 5 draws (each is 200 gradients)
                sal=dict(sens_samples=50, sens_normalize=SENS_REPORTED, infd_samples=1000, sg_samples=200,
                         shap_samples=1000, nb_samples=5000, ig_steps=10, square_sizes=(1, 10), per_example=True,
                         sens_variants=("local", "global_clipped", "local_clipped"),
                         method_sens={"IG": {"variants": ["local", "global_clipped"]},
                                      "Grad-SG": {"samples": 5, "variants": ["local"]},
                                      "GBP-SG": {"samples": 5, "variants": []},
                                      "IG-SG": {"examples": 10, "samples": 3, "variants": []},
                                      "SHAP": {"examples": 5, "samples": 10}, "Square": {"examples": 5, "samples": 5},
                                      "NB": {"examples": 3, "samples": 5}}),
                fig6=dict(examples=20, sens_samples=50, sg_samples=50, radii=[0.1, 0.25, 0.5, 1.0, 1.5, 2.0])),
    # the paper's sizes (Madry et al.: 100k iterations of batch 50 = 83 epochs of PGD-40, Adam 1e-4);
    # defined for a GPU, not run on the 2-core CPU machine
    "paper": dict(width=1.0, batch=50, lr=1e-4, natural_epochs=10, robust_epochs=83, eps=0.3, steps=40,
                  step_size=0.01, eps_warmup_epochs=0.0, val_size=5000, val_pgd_examples=5000, val_pgd_steps=40,
                  test_pgd=dict(examples=10000, steps=40, step_size=0.01), examples=50,
                  sal=dict(sens_samples=50, sens_normalize=SENS_REPORTED, infd_samples=10000, sg_samples=200,
                           shap_samples=20000, nb_samples=20000, ig_steps=10, square_sizes=(1, 10)),
                  fig6=dict(examples=50, sens_samples=50, sg_samples=200, radii=[0.1, 0.25, 0.5, 1.0, 1.5, 2.0])),
    # seconds-long smoke run of the whole MNIST pipeline (tiny training subset)
    "quick": dict(width=0.25, batch=64, lr=1e-3, natural_epochs=1, robust_epochs=2, robust_attack="fgsm_rs",
                  fgsm_step=0.375, robust_lr=5e-3, schedule="cyclic", eps=0.3, steps=2, step_size=0.2,
                  eps_warmup_epochs=0.5, val_size=200, val_pgd_examples=100, val_pgd_steps=3,
                  train_limit=1000,
                  test_pgd=dict(examples=100, steps=5, step_size=0.1), examples=3,
                  verify=dict(examples=40, eps=0.3, steps=3, restarts=2, step_sizes=[0.1, 0.2], square_queries=20,
                              curve=dict(examples=40, steps=3, radii=[0.0, 0.3, 0.5])),
                  sal=dict(sens_samples=2, sens_normalize=SENS_REPORTED, infd_samples=50, sg_samples=2,
                           shap_samples=50, nb_samples=200, ig_steps=3, square_sizes=(1, 3), per_example=True,
                           sens_variants=("local", "global_clipped", "local_clipped"),
                           method_sens={"Square": {"examples": 2, "samples": 3},
                                        "Grad-SG": {"samples": 2, "variants": ["local"]}}),
                  fig6=dict(examples=2, sens_samples=2, sg_samples=2, radii=[0.1, 1.0])),
}


def load_mnist(root: Path, val_size: int, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The official 60k/10k files; validation is a seeded random part of the 60k training images."""
    from ift.data.idx import find_idx_file, read_idx

    def pair(images, labels):
        paths = [find_idx_file(root, stem, "MNIST") for stem in (images, labels)]
        if None in paths:
            raise FileNotFoundError(f"--mnist-root {root}: {images}/{labels} (.gz) not found; the study needs the "
                                    f"full 60k/10k MNIST files")
        return read_idx(paths[0]).unsqueeze(1).float() / 255.0, read_idx(paths[1]).long()

    x, y = pair("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    val, train = perm[:val_size], perm[val_size:]
    return {"train": (x[train], y[train]), "val": (x[val], y[val]),
            "test": pair("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


@torch.no_grad()
def accuracy(net, x, y, batch: int = 1000) -> float:
    net.eval()
    return float(sum((net(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum() for i in range(0, len(x), batch)) / len(x))


def pgd_accuracy(net, x, y, eps: float, steps: int, step_size: float, batch: int = 500, seed: int = 0) -> float:
    """Accuracy under PGD (random start, eval mode)."""
    net.eval()
    gen = torch.Generator().manual_seed(seed)
    correct = 0
    for i in range(0, len(x), batch):
        adv = pgd_attack(net, x[i:i + batch], y[i:i + batch], eps, step_size, steps, generator=gen)
        with torch.no_grad():
            correct += int((net(adv).argmax(1) == y[i:i + batch]).sum())
    return correct / len(x)


def learning_rate(spec: dict, robust: bool, epoch: float, epochs: int) -> float:
    """``schedule`` "cyclic": triangular from 0 up to ``lr`` at 40 % of training and back to 0 (Wong et
    al. 2020); otherwise ``lr`` with the last epoch at lr / 10."""
    lr = spec.get("robust_lr", spec["lr"]) if robust else spec["lr"]
    if robust and spec.get("schedule") == "cyclic":
        t = epoch / epochs
        return lr * (t / 0.4 if t < 0.4 else max(0.0, (1 - t) / 0.6))
    return lr / 10 if (epochs > 1 and epoch >= epochs - 1) else lr


def train_mnist(data: dict, spec: dict, robust: bool, log, save=None, init: dict | None = None,
                resume: dict | None = None, seed: int = 0) -> tuple[nn.Module, dict]:
    """Adam on the training part. Robust: ``robust_attack`` "pgd" (PGD-``steps`` x ``step_size``) or
    "fgsm_rs" (FGSM with random start, step ``fgsm_step``) at eps, eps linearly warmed up from 0 over
    ``eps_warmup_epochs``; lr by ``learning_rate``. ``init``: a state dict to start from (fine-tuning);
    ``resume``: a saved checkpoint dict of this run (continues after its last finished epoch).
    ``save(net, history, state)`` runs after every epoch (a cut run leaves a usable, resumable checkpoint).
    History rows: adversarial train loss / accuracy (on the training attack's examples), natural train
    loss / accuracy (on a fixed 5000-image part of the training set), validation accuracy and, robust,
    validation PGD accuracy (``val_pgd_steps`` x ``step_size``)."""
    torch.manual_seed(seed)
    x, y = data["train"]
    if spec.get("train_limit"):
        x, y = x[:spec["train_limit"]], y[:spec["train_limit"]]
    net = build_network("madry_cnn", (1, 28, 28), 10, width=spec["width"])
    if init is not None:
        net.load_state_dict(init)
    opt = torch.optim.Adam(net.parameters(), lr=spec["lr"])
    epochs = spec["robust_epochs"] if robust else spec["natural_epochs"]
    steps_per_epoch = math.ceil(len(x) / spec["batch"])
    gen = torch.Generator().manual_seed(seed + 1)
    history, start, spent = [], 0, 0.0
    if resume is not None:
        net.load_state_dict(resume["state_dict"])
        opt.load_state_dict(resume["optimizer"])
        gen.set_state(resume["generator"])
        history, spent = resume["history"]["epochs"], resume["history"]["train_seconds"]
        start = len(history)
        log(f"resuming after epoch {start}")
    t0 = time.perf_counter() - spent
    vx, vy = data["val"]
    nx, ny = x[:5000], y[:5000]
    attack = spec.get("robust_attack", "pgd")
    for epoch in range(start, epochs):
        perm = torch.randperm(len(x), generator=gen)
        total, correct = 0.0, 0
        for i in range(steps_per_epoch):
            for group in opt.param_groups:
                group["lr"] = learning_rate(spec, robust, epoch + i / steps_per_epoch, epochs)
            idx = perm[i * spec["batch"]:(i + 1) * spec["batch"]]
            xb, yb = x[idx], y[idx]
            if robust:
                progress = (epoch + i / steps_per_epoch) / spec["eps_warmup_epochs"] if spec["eps_warmup_epochs"] else 1
                eps = spec["eps"] * min(1.0, progress)
                net.eval()
                if attack == "fgsm_rs":
                    xb = fgsm_rs_attack(net, xb, yb, eps, spec["fgsm_step"] * eps / spec["eps"], generator=gen)
                else:
                    step = spec.get("train_step_size", spec["step_size"])
                    xb = pgd_attack(net, xb, yb, eps, step * eps / spec["eps"], spec["steps"], generator=gen)
            net.train()
            logits = net(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(yb)
            correct += int((logits.argmax(1) == yb).sum())
        net.eval()
        with torch.no_grad():
            nat_loss = float(sum(F.cross_entropy(net(nx[j:j + 1000]), ny[j:j + 1000], reduction="sum")
                                 for j in range(0, len(nx), 1000)) / len(nx))
        row = {"epoch": epoch + 1, "train_loss": total / len(x), "train_acc": correct / len(x),
               "natural_train_loss": nat_loss, "natural_train_acc": accuracy(net, nx, ny),
               "val_acc": accuracy(net, vx, vy), "lr_end": opt.param_groups[0]["lr"]}
        if robust:
            n = spec["val_pgd_examples"]
            row["val_pgd_acc"] = pgd_accuracy(net, vx[:n], vy[:n], spec["eps"], spec["val_pgd_steps"],
                                              spec["step_size"])
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        log(f"{'robust' if robust else 'regular'} {row}")
        if save is not None:
            save(net, {"epochs": history, "train_seconds": time.perf_counter() - t0, "complete": epoch == epochs - 1},
                 {"optimizer": opt.state_dict(), "generator": gen.get_state()})
    return net.eval(), {"epochs": history, "train_seconds": time.perf_counter() - t0, "complete": True}


def checkpoint_path(ckpt_dir: Path, setting: str, label: str) -> Path:
    return ckpt_dir / f"saliency_{setting}_{label}.ckpt"


def weights_path(ckpt_dir: Path, setting: str, label: str) -> Path:
    """The weights alone (float32 state dict, ~12.5 MiB for the Madry CNN): what is worth keeping."""
    return ckpt_dir / f"saliency_{setting}_{label}.weights.pt"


def same_code(saved: dict, run: bench.Run) -> bool:
    """Whether a saved result of this script was produced by the code measured now (so it may be continued)."""
    return saved.get("provenance", {}).get("sources") == run.provenance["sources"]


def continued(path: Path, run: bench.Run, resume: bool) -> dict:
    """The saved result at ``path`` to continue (``--resume``), without the harness's keys; a result of
    other code is never mixed into a new one."""
    if not (resume and path.exists()):
        return {}
    saved = json.loads(path.read_text())
    if not same_code(saved, run):
        raise SystemExit(f"--resume: {bench.relative(path)} was produced by other code (or has no provenance); "
                         "rerun without --resume")
    return {k: v for k, v in saved.items() if k not in ("provenance", "environment", "arguments")}


def train_pair(setting: str, mnist_root: Path, ckpt_dir: Path, log, new_run, labels=("regular", "robust")) -> None:
    """Train the regular and the robust Madry CNN and save both (state dict + history + optimizer and
    sampler state, every epoch), the weights alone (``*.weights.pt``) and a training log with
    provenance and the weights' size and sha256 (``saliency_<setting>_<label>.json``). A checkpoint of
    an unfinished run of the same recipe is resumed; the robust run also keeps ``*_robust_best.ckpt``,
    its epoch of highest validation PGD accuracy (early stopping against catastrophic overfitting,
    Wong et al. 2020 sec. 5.3)."""
    spec = SETTINGS[setting]
    recipe = {k: v for k, v in spec.items() if k not in ("sal", "fig6", "examples", "test_pgd", "verify")}
    data = load_mnist(mnist_root, spec["val_size"])
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tx, ty = data["test"]
    for label in labels:
        robust = label == "robust"
        path = checkpoint_path(ckpt_dir, setting, label)
        resume = None
        if path.exists():
            saved = torch.load(path, map_location="cpu")
            if saved.get("spec") == recipe and not saved["history"].get("complete") and "optimizer" in saved:
                resume = saved
            elif saved.get("spec") == recipe:
                log(f"{path} is complete: skipping {label}")
                continue
        run = new_run(f"saliency_{setting}_{label}", out=ckpt_dir)

        def save(net, history, state):
            history["test_acc"] = accuracy(net, tx, ty)
            ckpt = {"state_dict": net.state_dict(), "width": spec["width"], "history": history, "setting": setting,
                    "spec": recipe, **state}
            torch.save(ckpt, path.with_suffix(".tmp"))
            path.with_suffix(".tmp").replace(path)  # atomic: a kill mid-save never leaves a broken checkpoint
            wpath = weights_path(ckpt_dir, setting, label)
            torch.save(net.state_dict(), wpath.with_suffix(".tmp"))
            wpath.with_suffix(".tmp").replace(wpath)
            run.write({"setting": setting, "label": label, "recipe": recipe, "width": spec["width"],
                       "weights": weights_record(wpath, net.state_dict()),
                       "checkpoint": {"file": path.name, "bytes": path.stat().st_size}, "history": history})
            if robust:
                best = checkpoint_path(ckpt_dir, setting, "robust_best")
                score = history["epochs"][-1]["val_pgd_acc"]
                if not best.exists() or score >= torch.load(best, map_location="cpu")["history"]["epochs"][-1]["val_pgd_acc"]:
                    torch.save(ckpt, best)

        init, source = None, spec.get("robust_init")
        if robust and source and resume is None:
            # "regular": fine-tune this setting's regular model; "setting:<name>": that setting's robust model
            src = checkpoint_path(ckpt_dir, setting, "regular") if source == "regular" else \
                checkpoint_path(ckpt_dir, source.removeprefix("setting:"), "robust")
            if not src.exists():
                raise SystemExit(f"robust_init: {bench.relative(src)} missing; train it first "
                                 f"(--setting {source.removeprefix('setting:')} --phase train --train-only robust)")
            init = torch.load(src, map_location="cpu")["state_dict"]
            log(f"robust: training on from {src}")
        net, history = train_mnist(data, spec, robust, log, save, init, resume)
        log(f"saved {label}: test acc {accuracy(net, tx, ty):.4f}, {history['train_seconds']:.0f}s")


def load_net(setting: str, ckpt_dir: Path, label: str, wait: bool = False) -> tuple[nn.Module, dict]:
    """A saved model and its training record (history, recipe, weights: size and sha256): from the full
    checkpoint, or from the weights-only file plus its training log, whose tensors' sha256 must match."""
    path, wpath = checkpoint_path(ckpt_dir, setting, label), weights_path(ckpt_dir, setting, label)
    logpath = path.with_suffix(".json")
    if path.exists():
        saved = torch.load(path, map_location="cpu")
        while wait and not saved["history"].get("complete"):  # the pair may still be training in the background
            log(f"waiting for the {label} training to finish")
            time.sleep(60)
            saved = torch.load(path, map_location="cpu")
        state, width, record = saved["state_dict"], saved["width"], {"history": saved["history"], "spec": saved["spec"]}
    elif wpath.exists() and logpath.exists():
        state, record = torch.load(wpath, map_location="cpu", weights_only=True), json.loads(logpath.read_text())
        width = record["width"]
        record = {"history": record["history"], "spec": record["recipe"], "weights": record["weights"]}
    else:
        raise SystemExit(f"{bench.relative(path)} (or {wpath.name} with {logpath.name}) missing: the trained models "
                         f"are not kept in git; retrain with python benchmarks/saliency_study.py --setting "
                         f"{setting} --phase train (robust_init {SETTINGS[setting].get('robust_init')})")
    if wpath.exists():
        now = weights_record(wpath, torch.load(wpath, map_location="cpu", weights_only=True))
        if record.get("weights") and record["weights"]["tensors_sha256"] != now["tensors_sha256"]:
            raise SystemExit(f"{wpath.name}: its tensors' sha256 differs from the one in {logpath.name}; "
                             "retrain or restore the matching pair")
        record["weights"] = now
    net = build_network("madry_cnn", (1, 28, 28), 10, width=width)
    net.load_state_dict(state)
    return net.eval(), record


def verify_pair(setting: str, mnist_root: Path, ckpt_dir: Path, out: Path, log, new_run, resume: bool = False) -> dict:
    """The robust model's accuracy under the strong attack suite of ``spec["verify"]`` on the first
    ``examples`` test images, each attack a per-example worst case over its restarts, combined into
    one worst case; the accuracy-vs-eps curve and the gradient-masking checks (``ift.saliency.verify``);
    the regular model under the same PGD. Written to saliency_verify_mnist_<setting>.json after every step."""
    from ift.saliency.verify import accuracy_curve, masking_checks, pgd_robust, square_robust

    spec, v = SETTINGS[setting], SETTINGS[setting]["verify"]
    tx, ty = load_mnist(mnist_root, spec["val_size"])["test"]
    x, y = tx[:v["examples"]], ty[:v["examples"]]
    run = new_run(f"saliency_verify_mnist_{setting}")
    res = continued(out / f"saliency_verify_mnist_{setting}.json", run, resume)
    res["settings"] = v
    kept: dict[str, torch.Tensor] = {k: torch.tensor(r["robust"]) for k, r in res.get("attacks", {}).items()}

    def net_of(label):
        net, record = load_net(setting, ckpt_dir, label, wait=True)
        res.setdefault("weights", {})[label] = record.get("weights")
        return net

    robust_net = net_of("robust")

    def attack(name, fn):
        if name not in kept:
            t0 = time.perf_counter()
            kept[name] = fn()
            res.setdefault("attacks", {})[name] = {"accuracy": float(kept[name].float().mean()),
                                                   "robust": kept[name].tolist(), "seconds": time.perf_counter() - t0}
            log(f"verify {name}: accuracy {res['attacks'][name]['accuracy']:.4f}")
        full = {k: t for k, t in kept.items() if len(t) == len(x)}  # attacks on a subset are reported alone
        worst = torch.stack(list(full.values())).all(0)
        res["worst_case"] = {"accuracy": float(worst.float().mean()), "attacks": list(full), "examples": len(x)}
        run.write(res)
        return kept[name]

    eps, steps, restarts = v["eps"], v["steps"], v["restarts"]
    for step in v["step_sizes"]:
        attack(f"pgd{steps}_step{step}_x{restarts}",
               lambda: pgd_robust(robust_net, x, y, eps, step, steps, restarts, seed=1))
    if "curve" not in res:
        c = v["curve"]
        res["curve"] = accuracy_curve(lambda e: pgd_robust(robust_net, x[:c["examples"]], y[:c["examples"]], e,
                                                           max(e, 1e-3) * 2.5 / c["steps"], c["steps"], 1, seed=2),
                                      c["radii"])
        log(f"verify curve: {res['curve']}")
    if v.get("square_queries"):
        try:
            n = v.get("square_examples", len(x))
            attack(f"square{v['square_queries']}_first{n}",
                   lambda: square_robust(robust_net, x[:n], y[:n], eps, v["square_queries"]))
        except ImportError as err:
            log(f"verify: no Square Attack ({err})")
    regular_net = net_of("regular")
    attack(f"transfer_from_regular_pgd{steps}", lambda: pgd_robust(robust_net, x, y, eps, 0.01, steps, 1, seed=3,
                                                                    source=regular_net))
    if "regular" not in res:
        ok = pgd_robust(regular_net, x, y, eps, 0.01, steps, 1, seed=1)
        res["regular"] = {"pgd_accuracy": float(ok.float().mean()), "attack": f"pgd{steps}_step0.01_x1"}
    # white box = PGD at every step size (per-example worst case); black box = transfer and Square
    pgd_names = [f"pgd{steps}_step{s}_x{restarts}" for s in v["step_sizes"]]
    white = torch.stack([kept[k] for k in pgd_names]).all(0)
    res["checks"] = masking_checks(res["curve"], white, {k: t for k, t in kept.items() if k not in pgd_names})
    res["checks"]["larger_step_extra_broken"] = int((kept[pgd_names[0]] & ~kept[pgd_names[-1]]).sum())
    res["checks"]["smaller_step_extra_broken"] = int((kept[pgd_names[-1]] & ~kept[pgd_names[0]]).sum())
    run.write(res)
    log(f"verify worst case {res['worst_case']}, checks {res['checks']}")
    return res


def load_pair(setting: str, ckpt_dir: Path, labels=("regular", "robust")) -> dict[str, tuple[nn.Module, dict]]:
    return {label: load_net(setting, ckpt_dir, label) for label in labels}


CHEAP_METHODS = ("Grad", "GBP", "IG", "Grad-SG", "GBP-SG")
COSTLY_METHODS = ("IG-SG", "Square", "SHAP", "NB")  # cheapest first
AUTHORS_SG = "Grad-SG, authors' global SG"
SENS_FORMS = ("", "global_clipped_", "local_", "local_clipped_")  # "" = global x * Phi at unclipped y


def train_linear(data: dict, epochs: int = 2, seed: int = 0) -> nn.Module:
    """The SENS-floor control: multinomial logistic regression on the training images (Adam 1e-3,
    batch 100). Its gradient is constant, so every change of its explanation is the x * Phi floor."""
    torch.manual_seed(seed)
    x, y = data["train"]
    net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(100):
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def quantus_rows(net, x, y, grad_row: dict, radius: float, samples: int, patch: int = 4) -> dict:
    """Quantus MaxSensitivity (global Grad, its own draws) and Infidelity (Grad, its black ``patch`` x
    ``patch`` square removal) beside ours: per-image differences, mean and standard error."""
    from ift.saliency.crosscheck import quantus_infidelity, quantus_max_sensitivity

    expl = to_global(gradient(net))
    q_sens, s_settings = quantus_max_sensitivity(net, expl, x, y, radius, samples)
    ours_sens = torch.tensor(grad_row["per_example"]["sens_max_input"]).numpy()
    q_infd, ours_infd, i_settings = quantus_infidelity(net, gradient(net)(x, y), x, y, patch=patch)

    def compare(ours, theirs, settings):
        d = ours - theirs
        se = float(d.std(ddof=1) / len(d) ** 0.5)
        return {"ours": float(ours.mean()), "quantus": float(theirs.mean()), "se": se,
                "ours_se": float(ours.std(ddof=1) / len(ours) ** 0.5),
                "quantus_se": float(theirs.std(ddof=1) / len(theirs) ** 0.5),
                # within 3 SE, or equal to float32 rounding (the infidelity is on the same perturbations)
                "agree_3se": bool(abs(d.mean()) <= 3 * se + 1e-5 * abs(theirs.mean()) + 1e-12), "examples": len(d),
                "settings": settings}

    return {"sens_max": compare(ours_sens, q_sens, {**s_settings, "ours": "sens_max_input of the Grad row "
                                                    "(global x * Phi, unclipped, same radius and samples)"}),
            "infidelity": compare(ours_infd, q_infd, {**i_settings, "ours": "infidelity_from_perturbations("
                                                      "optimal_scaling=False) on the perturbations Quantus applied"})}


def explain_pair(setting: str, mnist_root: Path, ckpt_dir: Path, out: Path, log, new_run, resume: bool = False,
                 labels=("regular", "robust"), fig6: bool = False) -> None:
    """Accuracies, probes, the linear-model control, Table 4 (every SENS normalisation and form side
    by side, per-example values kept for paired standard errors), the Quantus cross-check and the maps
    for the saved models ``labels``; the JSON / markdown are rewritten after every step, cheap methods
    first. ``resume``: keep the steps already in the saved JSON (if the same code produced it) and run
    only the missing ones (so the regular and the robust half can run one after the other, even in two
    processes: the writes merge under a lock). ``fig6``: also Figure 6 (regular)."""
    spec = SETTINGS[setting]
    data = load_mnist(mnist_root, spec["val_size"])
    pair = load_pair(setting, ckpt_dir, labels)
    tx, ty = data["test"]
    x, y = tx[:spec["examples"]], ty[:spec["examples"]]
    cfg = SaliencyConfig(**spec["sal"])
    name = f"mnist_{setting}"
    sizes = {k: v for k, v in spec.items() if k != "sal"} | {"sal": asdict(cfg)}
    saved_path = out / f"saliency_table4_{name}.json"
    table_run = new_run(f"saliency_table4_{name}")
    results = continued(saved_path, table_run, resume).get("results", {})
    if results:
        log(f"resuming from {bench.relative(saved_path)}")
    for label, (_, saved) in pair.items():
        results.setdefault(label, {"tables": {"global": {}}})
        results[label].update(training=saved["history"], spec=saved["spec"], weights=saved.get("weights"))
    maps_files = [f"saliency_maps_{name}_{label}.png" for label in ("regular", "robust")]

    def write():
        # another process may be explaining the other model into the same file: merge under a lock
        with open(Path(tempfile.gettempdir()) / f"saliency_table4_{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            other = json.loads(saved_path.read_text()) if saved_path.exists() else {}
            merged = other.get("results", {}) if same_code(other, table_run) else {}
            merged.update({k: v for k, v in results.items() if k in pair or k not in merged})
            proto = protocol(merged, spec, out, setting)
            table_run.write({"setting": setting, "sizes": sizes, "protocol": proto, "results": merged},
                      table4_mnist_markdown(name, merged, sizes, proto),
                      files=[f for f in maps_files if (out / f).exists()])

    for label, (net, _) in pair.items():
        r = results[label]
        if "test_acc" in r:
            continue
        r["test_acc"] = accuracy(net, tx, ty)
        r["probes"] = probes(net, x, y)
        r["probes"]["gbp_vs_grad"] = gbp_vs_grad(net, x, y)
        with torch.no_grad():
            r["predictions"] = net(x).argmax(1).tolist()
        log(f"{label}: test acc {r['test_acc']:.4f}, probes {r['probes']}")
        write()
    if "linear" not in results:
        lin = train_linear(data)
        metrics, _ = evaluate_method(lin, "Grad", x, y, cfg, local=False)
        results["linear"] = {"test_acc": accuracy(lin, tx, ty), "tables": {"global": {"Grad": metrics}}}
        log(f"linear control: test acc {results['linear']['test_acc']:.4f}, " + short(metrics))
        write()
    caches = {label: infidelity_cache(net, x, y, cfg, ("square", "noisy_baseline")) for label, (net, _) in pair.items()}
    maps = {label: {} for label in pair}

    def run(method, sg_global=None, row=None, run_cfg=cfg):
        for label, (net, _) in pair.items():
            if (row or method) in results[label]["tables"]["global"]:
                if row is None and method in CHEAP_METHODS:  # recompute the map only (cheap)
                    expl = make_explanation(method, net, sg_radius=cfg.sg_radius, sg_samples=cfg.sg_samples,
                                            ig_steps=cfg.ig_steps, generator=torch.Generator().manual_seed(cfg.seed),
                                            sg_global=cfg.sg_global if method.endswith("-SG") else None)
                    maps[label][method] = to_global(expl)(x, y)
                continue
            metrics, phi = evaluate_method(net, method, x, y, run_cfg, local=False, cache=caches[label],
                                           sg_global=sg_global)
            results[label]["tables"]["global"][row or method] = metrics
            if row is None and method != "Constant":  # the control's map is flat
                maps[label][method] = phi
            log(f"{label} {row or method}: " + short(metrics))
            write()

    def save_maps():
        for label, (net, _) in pair.items():
            save_maps_png(x, maps[label], out / f"saliency_maps_{name}_{label}.png", n_rows=6, labels=y,
                          preds=torch.tensor(results[label]["predictions"]),
                          title=f"{label} Madry CNN, global explanations (x * Phi), {setting} setting")

    for method in ("Grad", "GBP", "IG", "Constant"):
        run(method)
    for label, (net, _) in pair.items():
        if "quantus" not in results[label]:
            try:
                results[label]["quantus"] = quantus_rows(net, x, y, results[label]["tables"]["global"]["Grad"],
                                                         cfg.sens_radius, cfg.sens_samples)
                log(f"{label} quantus: {results[label]['quantus']}")
            except ImportError as err:
                log(f"no Quantus cross-check: {err}")
            write()
    for method in ("Grad-SG", "GBP-SG"):
        run(method)
    plain = {**cfg.method_sens, "Grad-SG": {**cfg.method_sens.get("Grad-SG", {}), "variants": []}}
    run("Grad-SG", sg_global="mean_of_products", row=AUTHORS_SG, run_cfg=replace(cfg, method_sens=plain))
    save_maps()
    for label, (net, _) in pair.items():
        if "Grad-SG" not in results[label].get("noise_floor", {}):
            results[label].setdefault("noise_floor", {})["Grad-SG"] = noise_floor(net, "Grad-SG", x[:5], y[:5],
                                                                                   cfg, 5)
            log(f"{label} Grad-SG noise floor: {results[label]['noise_floor']['Grad-SG']}")
            write()
    for method in COSTLY_METHODS:
        run(method)
        save_maps()
    if fig6 and "regular" in pair:
        figure6_mnist(pair["regular"][0], x, y, spec["fig6"], cfg, out, name, log, new_run)


def paired(reg: dict | None, rob: dict | None, key: str) -> dict | None:
    """Robust minus regular on the same images: mean and standard error of the per-image differences."""
    if not reg or not rob or key not in reg.get("per_example", {}) or key not in rob.get("per_example", {}):
        return None
    d = torch.tensor(rob["per_example"][key], dtype=torch.float64) - torch.tensor(reg["per_example"][key],
                                                                                  dtype=torch.float64)
    se = float(d.std() / len(d) ** 0.5) if len(d) > 1 else float("nan")
    return {"diff": float(d.mean()), "se": se, "n": len(d)}


def verdict(p: dict | None) -> str:
    if p is None:
        return "-"
    if not p["se"] > 0 or abs(p["diff"]) <= 2 * p["se"]:
        return f"{p['diff']:+.3g} ± {p['se']:.2g} (tie)"
    return f"{p['diff']:+.3g} ± {p['se']:.2g} (robust {'lower' if p['diff'] < 0 else 'higher'})"


def protocol(results: dict, spec: dict, out: Path, setting: str) -> dict:
    """The top-level ``protocol`` section: models, attack, counts, controls and the cross-check."""
    reg, rob, lin = (results.get(k, {}) for k in ("regular", "robust", "linear"))
    verify_path = out / f"saliency_verify_mnist_{setting}.json"
    ver = json.loads(verify_path.read_text()) if verify_path.exists() else {}
    v = spec.get("verify", {})
    lin_grad = lin.get("tables", {}).get("global", {}).get("Grad", {})
    controls = {}
    for norm in SENS_REPORTED:
        for form in SENS_FORMS:
            key = f"sens_max_{form}{norm}"
            if key in lin_grad:
                controls[f"linear_{(form or 'global_')}sens".replace("__", "_") + f"_{norm}"] = lin_grad[key]
    controls["linear_global_sens"] = lin_grad.get("sens_max_input")
    controls["linear_test_acc"] = lin.get("test_acc")
    tables = {k: r.get("tables", {}).get("global", {}) for k, r in (("regular", reg), ("robust", rob))}
    quantus = {}
    for part in ("sens_max", "infidelity"):
        if "quantus" in rob:
            quantus[part] = {**{k: rob["quantus"][part][k] for k in ("ours", "quantus", "se", "agree_3se")},
                             "model": "robust", "regular": reg.get("quantus", {}).get(part)}
    return {
        "regular": {"test_acc": reg.get("test_acc"), "pgd_accuracy": ver.get("regular", {}).get("pgd_accuracy")},
        "robust": {"from_scratch": True, "test_acc": rob.get("test_acc"),
                   "recipe": "8 epochs FGSM with random start (eps 0.3, step 0.375, cyclic lr to 5e-3) from random "
                             "initialisation, then 2 epochs PGD-10 x 0.075 (Adam 5e-4, then 5e-5); never "
                             "trained on natural images",
                   "attack": {"eps": v.get("eps"), "steps": v.get("steps"), "restarts": v.get("restarts"),
                              "step_sizes": v.get("step_sizes"), "examples": v.get("examples"),
                              "accuracy": ver.get("worst_case", {}).get("accuracy"),
                              "per_attack": {k: a["accuracy"] for k, a in ver.get("attacks", {}).items()},
                              "curve": ver.get("curve"), "masking_checks": ver.get("checks")}},
        "examples": spec["examples"],
        "counts": {m: {"infd_examples": spec["examples"], "sens_examples": t.get("sens_examples"),
                       "sens_samples": t.get("sens_samples")} for m, t in tables["robust"].items()},
        "sg_samples": spec["sal"].get("sg_samples"),
        "paired_se": True,
        "controls": controls,
        "quantus": quantus,
    }


def noise_floor(net, method: str, x, y, cfg: SaliencyConfig, samples: int) -> dict:
    """SENS_max at radius 0 of a Monte-Carlo explanation (global form): the explanation recomputed
    at the same x with fresh draws, i.e. the part of its SENS_max that is its own sampling noise."""
    expl = make_explanation(method, net, sg_radius=cfg.sg_radius, sg_samples=cfg.sg_samples, ig_steps=cfg.ig_steps,
                            shap_samples=cfg.shap_samples, max_batch=cfg.max_batch,
                            generator=torch.Generator().manual_seed(cfg.seed + 3),
                            sg_global=cfg.sg_global if method.endswith("-SG") else None)
    sens = max_sensitivities(to_global(expl), x, 0.0, samples, y, normalizations=cfg.normalizations,
                             max_batch=cfg.max_batch)
    return {"examples": len(x), "samples": samples,
            **{n: float(v.mean()) for n, v in sens.items()}, **{f"{n}_sem": sem(v) for n, v in sens.items()}}


def gbp_vs_grad(net, x, y) -> float:
    """Mean ``||GBP - Grad|| / ||Grad||`` at the examples: how far a real Guided Backprop is from the
    gradient (the authors' GBP on functional ReLUs replaces no module, so theirs is the gradient)."""
    g, b = gradient(net)(x, y).flatten(1), guided_backprop(net)(x, y).flatten(1)
    return float(((b - g).norm(dim=1) / g.norm(dim=1)).mean())


def figure6_mnist(net, x, y, fig: dict, cfg: SaliencyConfig, out: Path, name: str, log, new_run) -> None:
    """Local Grad-SG (noisy-baseline INFD, SENS_max) as the SmoothGrad radius grows (radius 0: Grad)."""
    run = new_run(f"saliency_fig6_{name}")
    x, y = x[:fig["examples"]], y[:fig["examples"]]
    base = replace(cfg, sens_samples=fig["sens_samples"], sg_samples=fig["sg_samples"], method_sens={})
    cache = infidelity_cache(net, x, y, base, ("noisy_baseline",))
    rows = []
    for r in [0.0, *fig["radii"]]:
        method = "Grad-SG" if r > 0 else "Grad"
        metrics, _ = evaluate_method(net, method, x, y, replace(base, sg_radius=r), local=True, cache=cache)
        rows.append({"radius": r, **metrics})
        log(f"fig6 radius {r}: " + short(metrics))
    norms = cfg.normalizations
    md = (f"Local Grad-SG on the regular model, {fig['examples']} test examples, {fig['sens_samples']} SENS samples "
          f"(radius {cfg.sens_radius}), {fig['sg_samples']} SmoothGrad samples, {cfg.infd_samples} noisy-baseline "
          "INFD samples; mean ± standard error.\n\n"
          + bench.table(["SG radius (0 = Grad)", "INFD (noisy baseline)", *(f"SENS_max ({n})" for n in norms)],
                        [[row["radius"], f"{row['infd']:.3g} ± {row['infd_sem']:.2g}",
                          *(f"{row[f'sens_max_{n}']:.3g} ± {row[f'sens_max_{n}_sem']:.2g}" for n in norms)]
                         for row in rows]))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    radii = [row["radius"] for row in rows]
    fig_, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    axes[0].errorbar(radii, [row["infd"] for row in rows], [row["infd_sem"] for row in rows], fmt="o-")
    axes[0].set_title("Infidelity (noisy baseline)", fontsize=9)
    axes[0].set_ylabel("INFD")
    for n in ("input", "unit"):  # the 2019 replay and the raw norm are on other scales: see the markdown
        axes[1].errorbar(radii, [row[f"sens_max_{n}"] for row in rows], [row[f"sens_max_{n}_sem"] for row in rows],
                         fmt="s-", label=f"{n} normalisation")
    axes[1].set_title(f"Max-sensitivity (r = {cfg.sens_radius})", fontsize=9)
    axes[1].set_ylabel("SENS_max")
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("SmoothGrad radius (0 = plain gradient)")
    fig_.suptitle(f"Figure 6 analogue: local Grad-SG, regular Madry CNN on MNIST ({name})", fontsize=9)
    fig_.tight_layout()
    run.write({"sizes": fig, "rows": rows}, md, figures={f"saliency_fig6_{name}.png": fig_})
    plt.close(fig_)


def short(metrics: dict) -> str:
    keys = [k for k in metrics if k.startswith("sens_max_") and not k.endswith("_sem")]
    return ", ".join(f"{k} {metrics[k]:.4g}" for k in ["infd", "infd_rel", *keys, "seconds"])


def cell(m: dict | None, key: str) -> str:
    return "-" if m is None or key not in m else f"{m[key]:.3g} ± {m[key + '_sem']:.2g}"


def label_of(method: str) -> str:
    return method + " (real GBP; the paper's row is Grad)" if method.startswith("GBP") else method


FORM_TITLES = {"": "global x*Phi", "global_clipped_": "global, y clipped to [0,1]", "local_": "local Phi",
               "local_clipped_": "local, clipped"}


def table4_mnist_markdown(name: str, results: dict, sizes: dict, proto: dict) -> str:
    sal = sizes["sal"]
    reg, rob = results.get("regular", {}), results.get("robust", {})
    t_reg, t_rob = reg.get("tables", {}).get("global", {}), rob.get("tables", {}).get("global", {})
    lin = results.get("linear", {}).get("tables", {}).get("global", {}).get("Grad")
    att = proto["robust"]["attack"]
    md = [f"### {name}: Table 4 on full MNIST (Madry CNN), regular vs robust trained from scratch", ""]
    rows = []
    for label, r in (("regular", reg), ("robust", rob)):
        if "test_acc" not in r:
            continue
        h = r["training"]
        tr = f"{len(h['epochs'])} epochs, {h['train_seconds'] / 60:.0f} min"
        if label == "robust":
            tr = proto["robust"]["recipe"] + f" (stage 2: {tr})"
            acc = "-" if att["accuracy"] is None else f"{att['accuracy']:.3f} ({att['examples']} images)"
        else:
            acc = "-" if proto["regular"]["pgd_accuracy"] is None else f"{proto['regular']['pgd_accuracy']:.3f}"
        rows.append([label, tr, f"{r['test_acc']:.4f}", acc, f"{r['probes']['grad_norm_logit']:.3g}",
                     f"{r['probes']['hessian_norm_logprob']:.3g}", f"{r['probes'].get('gbp_vs_grad', float('nan')):.3g}"])
    if "linear" in results:
        rows.append(["linear (control)", "logistic regression, 2 epochs", f"{results['linear']['test_acc']:.4f}", "-",
                     "-", "0", "-"])
    md.append(bench.table(["model", "training", "test acc (10k)", "robust acc, eps 0.3 (worst case of the attack suite)",
                           "mean grad norm (logit)", "mean Hessian norm (log-prob)",
                           "GBP vs Grad, mean relative L2 difference"], rows))
    if att.get("per_attack"):
        md += ["Attack suite (robust model, per-example worst case over restarts): "
               + ", ".join(f"{k} {v:.3f}" for k, v in att["per_attack"].items()) + "."]
    if att.get("curve"):
        md.append("Accuracy vs eps (PGD-50, step 2.5 eps / 50, 1 restart): "
                  + ", ".join(f"{c['eps']}: {c['accuracy']:.3f}" for c in att["curve"]) + ".")
    if att.get("masking_checks"):
        md.append(f"Gradient-masking checks: {att['masking_checks']}.")
    for label, r in (("regular", reg), ("robust", rob)):
        w = r.get("weights")
        if w:
            md.append(f"{label} weights: `{w['file']}`, {w['bytes'] / 2**20:.1f} MiB, tensors sha256 "
                      f"`{w['tensors_sha256'][:16]}`.")
    methods = list(dict.fromkeys([*t_reg, *t_rob]))
    md += ["", f"Counts: {sizes['examples']} test examples (the first of the test set) for every INFD and for "
           f"the SENS of every method unless the table says fewer; SENS radius {sal['sens_radius']}; SmoothGrad "
           f"radius {sal['sg_radius']} with {sal['sg_samples']} samples; IG {sal['ig_steps']} steps; SHAP "
           f"{sal['shap_samples']} samples; NB {sal['nb_samples']} samples; INFD over every square of side "
           f"{sal['square_sizes'][0]}..{sal['square_sizes'][1]} (NB: {sal['infd_samples']} noisy-baseline draws). "
           "Cells: mean ± standard error over images; 'robust - regular' is the mean ± standard error of the "
           "per-image differences (the same images and the same perturbation draws for both models); outside "
           "2 SE it is called lower / higher, else a tie. Paper: Table 4 of Yeh et al. 2019 "
           "(GBP there equals Grad, see docs/saliency.md)."]
    norms = [n for n in SENS_REPORTED if any(f"sens_max_{n}" in t_reg.get(m, {}) for m in methods)]
    for n in norms:
        forms = [f for f in SENS_FORMS if any(f"sens_max_{f}{n}" in t_reg.get(m, {}) for m in methods)]
        md += ["", f"**SENS_max, {n} normalisation** (the paper: robust < regular for every method)", ""]
        head = ["Method", "SENS examples x samples", "paper regular", "paper robust"]
        for f in forms:
            head += [f"{FORM_TITLES[f]}: regular", "robust", "robust - regular"]
        rows = []
        for m in methods:
            a, b = t_reg.get(m), t_rob.get(m)
            paper = PAPER_TABLE4.get(m) if n == "input_2019" else None
            row = [label_of(m), f"{(a or b)['sens_examples']} x {(a or b)['sens_samples']}",
                   *(("-", "-") if paper is None else (str(paper[0][0]), str(paper[1][0])))]
            for f in forms:
                key = f"sens_max_{f}{n}"
                row += [cell(a, key), cell(b, key), verdict(paired(a, b, key))]
            rows.append(row)
        if lin is not None:
            row = ["linear model Grad (control: Phi constant)", f"{lin['sens_examples']} x {lin['sens_samples']}", "-", "-"]
            for f in forms:
                row += [cell(lin, f"sens_max_{f}{n}"), "-", "-"]
            rows.append(row)
        md.append(bench.table(head, rows))
    md += ["(paper columns are shown beside the input_2019 replay of the authors' normalisation only)", "",
           "**INFD** (square removal; NB: noisy baseline), absolute and relative to the zero explanation", ""]
    rows = []
    for m in methods:
        a, b = t_reg.get(m), t_rob.get(m)
        paper = PAPER_TABLE4.get(m)
        rows.append([label_of(m), *(("-", "-") if paper is None else (str(paper[0][1]), str(paper[1][1]))),
                     cell(a, "infd"), cell(b, "infd"), verdict(paired(a, b, "infd")),
                     cell(a, "infd_rel"), cell(b, "infd_rel"), verdict(paired(a, b, "infd_rel"))])
    zero = [cell(t.get("Grad"), "infd_zero") if t.get("Grad") and "infd_zero_sem" in t["Grad"] else
            (f"{t['Grad']['infd_zero']:.3g}" if t.get("Grad") else "-") for t in (t_reg, t_rob)]
    rows.append(["zero explanation (E[df^2], square)", "-", "-", zero[0], zero[1],
                 verdict(paired(t_reg.get("Grad"), t_rob.get("Grad"), "infd_zero")), "1", "1", "-"])
    md.append(bench.table(["Method", "paper regular", "paper robust", "INFD regular", "INFD robust", "robust - regular",
                           "INFD/INFD(0) regular", "robust", "robust - regular"], rows))
    for label, r in (("regular", reg), ("robust", rob)):
        for m, f in r.get("noise_floor", {}).items():
            md.append(f"Noise floor, {label} {m}: SENS_max at radius 0 (the explanation recomputed at the same x with "
                      f"fresh draws; {f['examples']} examples x {f['samples']} samples): "
                      + ", ".join(f"{n} {f[n]:.3g} ± {f[n + '_sem']:.2g}" for n in norms if n in f) + ".")
    md += ["", *quantus_markdown({"regular": reg, "robust": rob})]
    missing = [m for m in METHODS if m not in methods]
    if missing:
        md += ["", f"Not finished: {', '.join(missing)}."]
    return "\n".join(md) + "\n"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main() -> None:
    parser = bench.parser(__doc__)
    parser.add_argument("--setting", choices=("digits", "cpu", "paper"), default="digits",
                        help="digits: toy, Prop. A.1 and the 8x8 digits study; cpu / paper: full MNIST (SETTINGS)")
    parser.add_argument("--phase", choices=("train", "verify", "explain", "all"), default="all",
                        help="MNIST settings: train and save the pair, verify the robust one, explain, or all")
    parser.add_argument("--mnist-root", type=Path, default=bench.REPO.parent / "shared" / "data" / "mnist",
                        help="folder with the four MNIST idx files (default ../shared/data/mnist)")
    parser.add_argument("--checkpoints", type=Path, default=None,
                        help="where the trained pair is saved (default benchmarks/checkpoints; *.ckpt and "
                             "*.weights.pt are not committed; with --quick a temporary folder)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-only", choices=("regular", "robust"), help="train one model of the pair")
    parser.add_argument("--resume", action="store_true",
                        help="verify / explain: run only the steps missing from the saved JSON (same code only)")
    parser.add_argument("--labels", default="regular,robust",
                        help="explain these saved models (e.g. regular now, robust later with --resume)")
    parser.add_argument("--fig6", action="store_true", help="explain: also Figure 6 on the regular model")
    parser.add_argument("--no-quantus", action="store_true", help="skip the Quantus cross-check")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = bench.out_dir(args)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="saliency_quick_ckpt_") as scratch:
        if args.checkpoints is not None:
            ckpt_dir = args.checkpoints
        else:  # a smoke run trains into a folder that goes away with it
            ckpt_dir = Path(scratch) if args.quick else bench.REPO / "benchmarks" / "checkpoints"
        study(args, out, ckpt_dir)


def study(args, out: Path, ckpt_dir: Path) -> None:

    def new_run(name: str, out: Path = out) -> bench.Run:
        return bench.Run(name, SOURCES, args, script="benchmarks/saliency_study.py", out=out)

    t0 = time.perf_counter()
    if args.setting == "digits":
        sizes = SIZES["quick" if args.quick else "full"]
        figure5(out, sizes["fig5"], new_run)
        digits = DigitsDataModule(batch_size=64)
        proposition_a1(digits, out, sizes["prop_a1"], new_run)
        models = table4("digits", digits, sizes["digits"], out, new_run, quantus=not args.no_quantus)
        figure6(models["regular"], digits, sizes["fig6_radii"], sizes["digits"], out, "digits", new_run)
    else:
        setting = "quick" if args.quick else args.setting
        if not (args.mnist_root / "train-images-idx3-ubyte.gz").is_file() and not (
                args.mnist_root / "train-images-idx3-ubyte").is_file():
            raise SystemExit(f"saliency_study: no MNIST idx files in {bench.relative(args.mnist_root)}; pass "
                             "--mnist-root DIR")
        if args.phase in ("train", "all"):
            labels = (args.train_only,) if args.train_only else ("regular", "robust")
            if SETTINGS[setting].get("robust_init", "").startswith("setting:") and "robust" in labels:
                stage1 = SETTINGS[setting]["robust_init"].removeprefix("setting:")
                if not checkpoint_path(ckpt_dir, stage1, "robust").exists():
                    train_pair(stage1, args.mnist_root, ckpt_dir, log, new_run, ("robust",))
            train_pair(setting, args.mnist_root, ckpt_dir, log, new_run, labels)
        if args.phase in ("verify", "all"):
            verify_pair(setting, args.mnist_root, ckpt_dir, out, log, new_run, args.resume)
        if args.phase in ("explain", "all"):
            explain_pair(setting, args.mnist_root, ckpt_dir, out, log, new_run, args.resume,
                         labels=tuple(args.labels.split(",")), fig6=args.fig6)
    log(f"total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
