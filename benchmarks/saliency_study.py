"""Yeh et al. 2019 on CPU: regular vs PGD-trained classifiers, SENS_max / INFD of every explanation
(Table 4 analogue, digits and MNIST), Grad-SG vs smoothing radius (Figure 6), the toy function of
Appendix A.5 (Figure 5) and the Proposition A.1 bound check.

    python benchmarks/saliency_study.py            # writes benchmarks/results/saliency_*.{json,md,png}
    python benchmarks/saliency_study.py --quick    # seconds-long smoke run into /tmp

Sizes are cut down for 2 CPU cores (see SIZES); the paper's are 50 examples, 50 sensitivity
samples, 200 SmoothGrad samples, 20k samples for NB and 1000 for INFD.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import lightning as L
import torch

from ift.data import DigitsDataModule, MNISTDataModule
from ift.saliency import (gradient, infidelity, input_gradient_norm, input_hessian_norm,
                          max_sensitivity, smooth, softplus_gradient_lipschitz)
from ift.saliency.module import ClassifierModule, first_examples
from ift.saliency.report import SaliencyConfig, markdown_table, saliency_table, save_maps_png

PAPER_TABLE4 = {  # MNIST, regular / robust: (SENS_max, INFD), global explanations (Table 4)
    "Grad": ((2.32, 2.42), (0.21, 0.36)), "Grad-SG": ((1.82, 1.88), (0.13, 0.35)),
    "IG": ((2.05, 1.78), (0.16, 0.21)), "IG-SG": ((1.69, 1.77), (0.11, 0.2)),
    "GBP": ((2.36, 2.42), (0.21, 0.36)), "GBP-SG": ((1.83, 1.82), (0.13, 0.35)),
    "SHAP": ((0.35, 1.20), (0.23, 0.14)), "Square": ((0.24, 0.46), (0.11, 0.06)),
}

SIZES = {
    "full": {
        "digits": dict(epochs=10, width=1.0, eps=0.1, step_size=0.025, steps=10, examples=20,
                       sal=dict(sens_samples=20, infd_samples=1000, sg_samples=50, shap_samples=1000,
                                nb_samples=5000, ig_steps=10, square_sizes=(1, 4), local=True)),
        "mnist": dict(epochs=3, width=0.5, eps=0.2, step_size=0.05, steps=7, examples=8,
                      sal=dict(sens_samples=8, infd_samples=500, sg_samples=30, shap_samples=500,
                               nb_samples=3000, ig_steps=10, square_sizes=(1, 10), local=True)),
        "fig6_radii": [0.1, 0.2, 0.5, 1.0, 1.5, 2.0],
    },
    "quick": {
        "digits": dict(epochs=1, width=0.5, eps=0.1, step_size=0.05, steps=2, examples=2,
                       sal=dict(sens_samples=2, infd_samples=50, sg_samples=2, shap_samples=50, nb_samples=200,
                                ig_steps=3, square_sizes=(1, 2), local=True)),
        "mnist": None,
        "fig6_radii": [0.1, 1.0],
    },
}


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


def table4(name: str, datamodule, spec: dict, out: Path) -> dict:
    models, results = {}, {}
    for label, pgd in (("regular", False), ("robust", True)):
        model, metrics = train(datamodule, pgd, spec)
        models[label] = model
        x, y = first_examples(datamodule, spec["examples"])
        cfg = SaliencyConfig(**spec["sal"])
        t0 = time.perf_counter()
        tables, maps = saliency_table(model.net, x, y, cfg)
        save_maps_png(x, maps, out / f"saliency_maps_{name}_{label}.png")
        results[label] = {"accuracy": metrics, "probes": probes(model.net, x, y), "tables": tables,
                          "saliency_seconds": time.perf_counter() - t0, "arch": model.arch,
                          "attack": model.attack}
        print(name, label, metrics, results[label]["probes"], flush=True)
    payload = {"sizes": spec, "results": results}
    (out / f"saliency_table4_{name}.json").write_text(json.dumps(payload, indent=2, default=list))
    (out / f"saliency_table4_{name}.md").write_text(table4_markdown(name, results, spec))
    return models


def table4_markdown(name: str, results: dict, spec: dict) -> str:
    md = [f"### {name}: regular vs PGD-trained ({results['regular']['arch']}, "
          f"PGD eps {results['robust']['attack']['eps']}, {spec['examples']} test examples)", "",
          "| model | test acc | test PGD acc | mean grad norm (logit) | mean Hessian norm (log-prob) |",
          "|---|---|---|---|---|"]
    for label, r in results.items():
        md.append(f"| {label} | {r['accuracy']['test/acc']:.3f} | {r['accuracy']['test/pgd_acc']:.3f} | "
                  f"{r['probes']['grad_norm_logit']:.3g} | {r['probes']['hessian_norm_logprob']:.3g} |")
    md += ["", markdown_table({}, {label: r["tables"] for label, r in results.items()})]
    if name == "mnist":
        md += ["Paper, Table 4 (MNIST, global explanations, Madry et al.'s robust model):", "",
               "| Method | regular SENS_max | regular INFD | robust SENS_max | robust INFD |", "|---|---|---|---|---|"]
        md += [f"| {m} | {a[0]} | {a[1]} | {b[0]} | {b[1]} |" for m, (a, b) in PAPER_TABLE4.items()]
    return "\n".join(md) + "\n"


def figure6(model, datamodule, radii, spec: dict, out: Path, name: str) -> None:
    """INFD (local, noisy baseline) and SENS_max of Grad-SG as the SmoothGrad radius grows."""
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
        rows.append({"radius": r, "infd": float(infd.mean()), "sens_max": float(sens.mean())})
        print("fig6", rows[-1], flush=True)
    (out / f"saliency_fig6_{name}.json").write_text(json.dumps(rows, indent=2))
    md = ["| SG radius (0 = Grad) | INFD (noisy baseline) | SENS_max (r = 0.1) |", "|---|---|---|"]
    md += [f"| {r['radius']} | {r['infd']:.4g} | {r['sens_max']:.4g} |" for r in rows]
    (out / f"saliency_fig6_{name}.md").write_text("\n".join(md) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([r["radius"] for r in rows], [r["infd"] for r in rows], "o-", label="INFD")
    ax.plot([r["radius"] for r in rows], [r["sens_max"] for r in rows], "s-", label="SENS_max")
    ax.set_xlabel("SmoothGrad radius")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"saliency_fig6_{name}.png", dpi=100)
    plt.close(fig)


def toy_f(p: torch.Tensor) -> torch.Tensor:
    """Appendix A.5: with k = floor(|a - b|), f = max(a, b) - k/2 for even k, min(a, b) + (k+1)/2 for odd k."""
    a, b = p[..., 0], p[..., 1]
    k = torch.floor((a - b).abs())
    even = torch.remainder(k, 2) == 0
    return torch.where(even, torch.maximum(a, b) - k / 2, torch.minimum(a, b) + (k + 1) / 2)


def figure5(out: Path) -> None:
    def grad(p):
        p = p.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(toy_f(p).sum(), p)
        return g

    pts = torch.tensor([[20.0, 11.9], [20.0, 12.1], [20.0, 15.9]], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    sg_radius = 10.0
    deltas = (torch.rand(20000, 1, 2, generator=g, dtype=torch.float64) * 2 - 1) * sg_radius
    sg = torch.stack([grad(p + deltas).mean(0).squeeze(0) for p in pts.unsqueeze(1)])
    # SENS_max (r = 0.25, raw L2) of Grad and Grad-SG at (20, 11.9)
    near = pts[0] + (torch.rand(200, 2, generator=g, dtype=torch.float64) * 2 - 1) * 0.25
    sens_grad = float((grad(near) - grad(pts[:1])).norm(dim=1).max())
    sg_near = torch.stack([grad(q + deltas.squeeze(1)).mean(0) for q in near[:40]])
    sens_sg = float((sg_near - sg[0]).norm(dim=1).max())
    result = {"f": toy_f(pts).tolist(), "grad": grad(pts).tolist(), "grad_sg": sg.tolist(), "sg_radius": sg_radius,
              "sens_max_grad_r0.25": sens_grad, "sens_max_grad_sg_r0.25": sens_sg,
              "paper": {"f": [16, 16.1, 18], "grad": [[1, 0], [0, 1], [1, 0]], "grad_sg": "about (0.5, 0.5)"}}
    (out / "saliency_fig5_toy.json").write_text(json.dumps(result, indent=2))
    md = ["| point | f | Grad | Grad-SG (uniform L-inf, radius 10) |", "|---|---|---|---|"]
    for p, fv, gr, s in zip(pts.tolist(), result["f"], result["grad"], result["grad_sg"]):
        md.append(f"| {tuple(p)} | {fv:.3g} | {tuple(round(v, 3) for v in gr)} | {tuple(round(v, 3) for v in s)} |")
    md.append(f"\nSENS_max at (20, 11.9), radius 0.25: Grad {sens_grad:.3g}, Grad-SG {sens_sg:.3g}")
    (out / "saliency_fig5_toy.md").write_text("\n".join(md) + "\n")
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
    fig.savefig(out / "saliency_fig5_toy.png", dpi=100)
    plt.close(fig)


def proposition_a1(datamodule, out: Path, epochs: int) -> None:
    """Measured SENS_max (raw L2, max over MC samples) of a bias-free Softplus MLP's gradient vs the
    bound L * r * sqrt(d) (L: Lipschitz constant of the gradient from the weights; ||d||_2 <= r sqrt(d))."""
    L.seed_everything(0)
    model = ClassifierModule(datamodule.shape, datamodule.num_classes, arch="softplus_mlp", hidden=(32, 32),
                             eval_pgd=False)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=datamodule)
    net = model.net.double().eval()
    x, y = first_examples(datamodule, 20)
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
    for r in (0.01, 0.05, 0.1, 0.2, 0.5):
        sens = max_sensitivity(grad, x, r, 200, y, normalize="none", generator=torch.Generator().manual_seed(0))
        rows.append({"radius": r, "sens_max_mean": float(sens.mean()), "sens_max_max": float(sens.max()),
                     "bound_spectral": bound_l * r * math.sqrt(d), "bound_fro": bound_l_fro * r * math.sqrt(d)})
        print("propA1", rows[-1], flush=True)
    (out / "saliency_prop_a1.json").write_text(json.dumps({"lipschitz_spectral": bound_l, "lipschitz_fro": bound_l_fro,
                                                           "d": d, "rows": rows}, indent=2))
    md = ["| radius r | measured SENS_max (mean / max over 20 examples) | bound L r sqrt(d), spectral | Frobenius |",
          "|---|---|---|---|"]
    md += [f"| {r['radius']} | {r['sens_max_mean']:.3g} / {r['sens_max_max']:.3g} | {r['bound_spectral']:.3g} | "
           f"{r['bound_fro']:.3g} |" for r in rows]
    (out / "saliency_prop_a1.md").write_text("\n".join(md) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, writes to /tmp/saliency_quick")
    parser.add_argument("--mnist-root", default="/work/shared/data/mnist")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--markdown-only", action="store_true",
                        help="rebuild the Table 4 markdown from the saved JSON (no training)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = SIZES["quick" if args.quick else "full"]
    out = Path("/tmp/saliency_quick") if args.quick else Path(__file__).parent / "results"
    out.mkdir(parents=True, exist_ok=True)
    if args.markdown_only:
        for path in sorted(out.glob("saliency_table4_*.json")):
            name = path.stem.removeprefix("saliency_table4_")
            saved = json.loads(path.read_text())
            (out / f"saliency_table4_{name}.md").write_text(table4_markdown(name, saved["results"], saved["sizes"]))
        return
    t0 = time.perf_counter()
    figure5(out)
    digits = DigitsDataModule(batch_size=64)
    proposition_a1(digits, out, epochs=sizes["digits"]["epochs"])
    models = table4("digits", digits, sizes["digits"], out)
    figure6(models["regular"], digits, sizes["fig6_radii"], sizes["digits"], out, "digits")
    if sizes["mnist"] is not None and Path(args.mnist_root).exists():
        mnist = MNISTDataModule(root=args.mnist_root, batch_size=128)
        models = table4("mnist", mnist, sizes["mnist"], out)
        figure6(models["regular"], mnist, sizes["fig6_radii"], sizes["mnist"], out, "mnist")
    print(f"total {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
