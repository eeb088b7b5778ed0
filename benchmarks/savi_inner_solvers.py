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
example), and the wall time, median [min, max] of --repeats interleaved runs after one warm-up
round (1 torch thread), with the per-round ratio to the default.

    python benchmarks/savi_inner_solvers.py            # ~2 min on one idle core
    python benchmarks/savi_inner_solvers.py --quick    # smoke run (20 s; numbers meaningless)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ift import bench
from ift.savi.inner import InnerConfig, refine
from ift.savi.model import GaussianVAE

DATA = bench.REPO.parent / "shared" / "data" / "mnist"
SOURCES = ["src/ift/savi/inner.py", "src/ift/savi/model.py", "src/ift/implicit/minimize.py",
           "src/ift/implicit/proximal.py", "src/ift/implicit/config.py", "src/ift/implicit/linear_solvers.py"]

SOLVERS = {
    "newton (exact, default)": dict(method="newton", curvature="exact", max_iter=20),
    "newton (Gauss-Newton)": dict(method="newton", curvature="gauss_newton", max_iter=50),
    "newton (autodiff Hessian)": dict(method="newton", curvature="autodiff", max_iter=20),
    "sgd lr 0.1, 50 steps": dict(method="sgd", lr=0.1, momentum=0.5, clip=5.0, max_iter=50),
    "sgd Kim et al. (lr 1, 20 steps)": dict(method="sgd", lr=1.0, momentum=0.5, clip=5.0, max_iter=20),
    "adam lr 0.05, 50 steps": dict(method="adam", lr=0.05, max_iter=50),
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
    parser = bench.parser(__doc__)
    parser.add_argument("--train-steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data-root", type=Path, default=DATA, help="folder with the MNIST idx .gz files")
    args = parser.parse_args()
    if args.quick:
        args.train_steps, args.batch, args.repeats = 20, 16, 1
    if not (args.data_root / "train-images-idx3-ubyte.gz").is_file():
        sys.exit(f"savi_inner_solvers: no MNIST idx files in {args.data_root}; pass --data-root DIR")
    torch.set_num_threads(1)
    run = bench.Run("savi_inner_solvers", SOURCES, args)
    vae, test = train_vae(args.train_steps, args.data_root)
    x = test[: args.batch]
    eps = torch.randn(4, args.batch, 8, generator=torch.Generator().manual_seed(1))
    params = {k: v.detach() for k, v in vae.generative_params().items()}
    lam0 = vae.encode(x).detach()
    configs = {name: InnerConfig(**{"tol": 1e-5, **kw}) for name, kw in SOLVERS.items()}
    times = bench.interleaved(
        {name: (lambda cfg=cfg: refine(vae, x, lam0, eps, params, cfg, create_graph=False)) for name, cfg in configs.items()},
        repeats=args.repeats)
    reference = -times["newton (exact, default)"].last.value
    records, cells = [], []
    for name, timing in times.items():
        r = timing.last
        ok = ~r.diverged
        records.append({
            "solver": name, "config": SOLVERS[name], "converged_frac": float(r.converged.float().mean()),
            "stationarity_median": float(r.stationarity[ok].median()), "stationarity_max": float(r.stationarity[ok].max()),
            "iterations_mean": float(r.iterations.float().mean()), "iterations_max": int(r.iterations.max()),
            "J_minus_newton_mean": float((-r.value - reference).mean()), "diverged": int(r.diverged.sum()),
            "time": timing.to_dict(),
            "time_over_default": bench.ratio(timing, times["newton (exact, default)"]).to_dict(),
        })
        cells.append([name, f"{records[-1]['converged_frac']:.3f}", f"{records[-1]['stationarity_median']:.1e}",
                      f"{records[-1]['stationarity_max']:.1e}", f"{records[-1]['iterations_mean']:.1f}",
                      records[-1]["iterations_max"], f"{records[-1]['J_minus_newton_mean']:+.3f}",
                      timing.spread().fmt(".3f"), bench.ratio(timing, times["newton (exact, default)"]).fmt()])
    gamma = float(vae.gamma.detach())
    markdown = (
        f"# SAVI inner solvers at MNIST curvature\n\n{bench.describe(run.environment)}; batch {args.batch}, "
        f"VAE after {args.train_steps} MNIST steps (gamma {gamma:.4f}), eta 1, 4 noise draws; times: median "
        f"[min, max] of {args.repeats} interleaved runs, ratio per round.\n\n"
        + bench.table(["solver", "frac <= 1e-5", "stationarity median", "max", "iterations mean", "max",
                       "J - J_newton (nats)", "time s", "time / default"], cells))
    run.write({"gamma": gamma, "records": records}, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
