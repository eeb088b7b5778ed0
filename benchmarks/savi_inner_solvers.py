"""Inner solvers of SAVI at MNIST curvature: who reaches stationarity, in how many iterations, at
what cost.

A VAE (8 latents, gamma learned from 0.02) is trained for --train-steps amortized steps on the
MNIST training files (the decoder's curvature after that is what the inner problem of every SAVI
mode faces early in training: largest Hessian eigenvalue ~100 per example, indefinite at
lambda_0 for some). Then, on --batch test images with 4 fixed noise draws and the proximal
term eta = 1, each inner solver runs from lambda_0 = enc(x) without a graph:

- newton (exact latent-space Hessian; the default), newton with Gauss-Newton curvature, newton
  with the generic autodiff Hessian (2d Hessian-vector products),
- SGD lr 0.1 / 50 steps (the previous default), Kim et al.'s SGD (lr 1, momentum 0.5, clip 5,
  20 steps), Adam lr 0.05 / 50 steps.

Reported: fraction of examples at relative stationarity <= 1e-5, median / max stationarity,
mean / max accepted iterations, the mean objective J relative to the default Newton's (nats per
example), and the median wall time of --repeats interleaved runs (1 torch thread).

    python benchmarks/savi_inner_solvers.py
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from ift.savi.inner import InnerConfig, refine
from ift.savi.model import GaussianVAE

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

SOLVERS = {
    "newton (exact, default)": dict(optimizer="newton", curvature="exact", steps=20),
    "newton (Gauss-Newton)": dict(optimizer="newton", curvature="gauss_newton", steps=50),
    "newton (autodiff Hessian)": dict(optimizer="newton", curvature="autodiff", steps=20),
    "sgd lr 0.1, 50 steps": dict(optimizer="sgd", lr=0.1, momentum=0.5, clip=5.0, steps=50),
    "sgd Kim et al. (lr 1, 20 steps)": dict(optimizer="sgd", lr=1.0, momentum=0.5, clip=5.0, steps=20),
    "adam lr 0.05, 50 steps": dict(optimizer="adam", lr=0.05, steps=50),
}


def train_vae(steps: int, data_root: Path) -> tuple[GaussianVAE, torch.Tensor]:
    from ift.data.idx import read_idx

    train = read_idx(data_root / "train-images-idx3-ubyte.gz").float().div(255).flatten(1)
    test = read_idx(data_root / "t10k-images-idx3-ubyte.gz").float().div(255).flatten(1)
    torch.manual_seed(0)
    vae = GaussianVAE(784, 8, (128, 128), gamma_init=0.02)
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = train[torch.randint(0, len(train), (128,), generator=gen)]
        loss = -vae.elbo(x, vae.encode(x), vae.sample_eps(128, 1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return vae, test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data" / "mnist")
    parser.add_argument("--out", type=Path, default=RESULTS / "savi_inner_solvers.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    vae, test = train_vae(args.train_steps, args.data_root)
    x = test[: args.batch]
    eps = torch.randn(4, args.batch, 8, generator=torch.Generator().manual_seed(1))
    params = {k: v.detach() for k, v in vae.generative_params().items()}
    lam0 = vae.encode(x).detach()
    configs = {name: InnerConfig(**{"tol": 1e-5, **kw}) for name, kw in SOLVERS.items()}

    times: dict[str, list[float]] = {name: [] for name in SOLVERS}
    results = {}
    for _ in range(args.repeats):  # interleaved
        for name, cfg in configs.items():
            start = time.perf_counter()
            results[name] = refine(vae, x, lam0, eps, params, cfg, create_graph=False)
            times[name].append(time.perf_counter() - start)
    reference = -results["newton (exact, default)"].value
    records = []
    for name, r in results.items():
        ok = ~r.diverged
        records.append({
            "solver": name, "config": SOLVERS[name], "converged_frac": float(r.converged.float().mean()),
            "stationarity_median": float(r.stationarity[ok].median()), "stationarity_max": float(r.stationarity[ok].max()),
            "iterations_mean": float(r.iterations.float().mean()), "iterations_max": int(r.iterations.max()),
            "J_minus_newton_mean": float((-r.value - reference).mean()), "diverged": int(r.diverged.sum()),
            "time_s": statistics.median(times[name]),
        })
    meta = {"torch": torch.__version__, "platform": platform.platform(), "threads": 1, "batch": args.batch,
            "train_steps": args.train_steps, "gamma": float(vae.gamma), "repeats": args.repeats}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "records": records}, indent=2))
    lines = ["| solver | frac <= 1e-5 | stationarity median | max | iterations mean | max | "
             "J - J_newton (nats) | time s | time / default |", "|---|" + "---:|" * 8]
    base = records[0]["time_s"]
    for r in records:
        lines.append(f"| {r['solver']} | {r['converged_frac']:.3f} | {r['stationarity_median']:.1e} | "
                     f"{r['stationarity_max']:.1e} | {r['iterations_mean']:.1f} | {r['iterations_max']} | "
                     f"{r['J_minus_newton_mean']:+.3f} | {r['time_s']:.3f} | {r['time_s'] / base:.2f}x |")
    table = "\n".join(lines) + "\n"
    args.out.with_suffix(".md").write_text(
        f"Command: `python benchmarks/savi_inner_solvers.py` (CPU, 1 thread, batch {args.batch}, VAE after "
        f"{args.train_steps} MNIST steps, gamma {meta['gamma']:.4f}, eta 1, 4 noise draws; median of "
        f"{args.repeats} interleaved runs)\n\n{table}")
    print(table)


if __name__ == "__main__":
    main()
