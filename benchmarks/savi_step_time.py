"""Step time of one SAVI training step at MNIST size (784-dim, batch 128): vae, savi_ift,
savi_unrolled, savi_checkpointed (and savi_reversible where its config exists), and with
--old-tree the savi_ift of another source tree (the baseline a7a71c6) in the same interleaved run.

A VAE is first trained amortized for --train-steps steps (MNIST training images from --data-root;
synthetic MNIST-shaped data from a random 8-latent teacher decoder when the folder is absent), so the
inner problem has the curvature of early training (gamma ~ 0.02, Newton's ~5 iterations). Each mode
then runs in its own worker process (each tree's `ift` imported there, so two versions never share
one interpreter), starting every timed step from that same state, batch and noise seed: one step =
`training_step` (inner solve included) + backward + Adam step, in the default model config of the
tree (`model.inner.tol=1e-5`, `model.inner_samples=4`). Rounds are interleaved across all workers
(alternating order); reported per mode: median [min, max] step time, the per-round ratio to vae,
and the inner / backward diagnostics of the timed steps (every inner solve stationary:
nonstationary fraction 0, max stationarity <= tol; backward linear solve converged).

--profile adds, for savi_ift of each tree, where one step's wall time goes (exclusive time of the
Hessian build, value+gradient, Newton linear algebra, trials, compaction, the IFT backward's HVPs,
...), as fractions of the same steps.

    git archive a7a71c6 | tar -x -C /tmp/ift_a7a71c6
    python benchmarks/savi_step_time.py --old-tree /tmp/ift_a7a71c6 --profile   # ~6 min on 1 idle core
    python benchmarks/savi_step_time.py --quick                                  # smoke, ~1 min
"""

from __future__ import annotations

import collections
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ("vae", "savi_ift", "savi_unrolled", "savi_checkpointed", "savi_reversible")
# The configs of the timed modes (each inherits vae.yaml), not the whole folder: a new model config
# does not change what this measures.
SOURCES = ["src/ift/savi", "src/ift/implicit", *(f"configs/model/{m}.yaml" for m in MODES)]
MNIST = REPO.parent / "shared" / "data" / "mnist"


# --- worker (one process per tree and mode) --------------------------------------------------------
def worker(src: str, mode: str, state_file: str, threads: int) -> None:
    """Serve `step` / `profile` requests on stdin for one mode of the tree whose `src/` is `src`."""
    sys.path.insert(0, src)
    import warnings

    import torch
    from omegaconf import OmegaConf

    import ift
    from ift.config import compose_config
    from ift.savi.module import SAVIModule

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    assert Path(ift.__file__).resolve().is_relative_to(Path(src).resolve()), ift.__file__
    saved = torch.load(state_file, weights_only=True)
    cfg = compose_config("train", [f"model={mode}", "logger=none"], tempfile.mkdtemp())
    kwargs = OmegaConf.to_container(cfg.model, resolve=False)  # runs_on: the config's data declaration (newer trees)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("_target_", "runs_on") and not (isinstance(v, str) and "${" in v)}
    module = SAVIModule(**{**kwargs, "input_shape": [1, 28, 28]})
    module.load_state_dict(saved["state"])
    x = saved["x"]

    def step(seed: int) -> dict:
        module.load_state_dict(saved["state"])
        opt = torch.optim.Adam(module.parameters(), lr=module.hparams.lr)
        module.solves.pop()
        torch.manual_seed(seed)
        wall, cpu = time.perf_counter(), time.thread_time()
        loss = module.training_step((x, None), 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out = {"wall": time.perf_counter() - wall, "cpu": time.thread_time() - cpu}
        return {**out, **diagnostics(module.solves.last, module.inner_cfg.tol)}

    for line in sys.stdin:
        request = json.loads(line)
        if request["cmd"] == "step":
            reply = step(request["seed"])
        else:
            reply = profile(step, request["seeds"])
        print(json.dumps(reply), flush=True)


def diagnostics(last: dict, tol: float) -> dict:
    out = {}
    inner, back = last.get("inner"), last.get("ift")
    if inner is not None:
        out.update(inner_iterations=float(inner.iterations.float().mean()),
                   nonstationary_frac=float(((inner.stationarity > tol) & ~inner.diverged).float().mean()),
                   stationarity_max=float(inner.stationarity.max()), diverged=int(inner.diverged.sum()))
    if back is not None:
        out.update(backward_iterations=float(back.iterations.float().mean()),
                   backward_converged=bool(back.converged.all()), backward_residual_max=float(back.residual.max()))
    return out


PROFILE_POINTS = [  # (module, attribute, label): exclusive wall time of each call, nested ones subtracted
    ("ift.savi.model", "GaussianVAE.neg_elbo_hessian", "inner: Hessian build"),
    ("ift.implicit.minimize", "_value_and_grad", "inner: value + gradient"),
    ("torch.linalg", "eigvalsh", "inner: eigvalsh (damping)"),
    ("torch.linalg", "solve", "inner: Newton step solves"),
    ("ift.implicit.minimize", "_newton_iteration", "inner: trial points, acceptance, masks"),
    ("ift.implicit.minimize", "_loop", "inner: loop and compaction"),
    ("ift.implicit.minimize", "_finish", "inner: final evaluation"),
    ("ift.implicit.minimize", "minimize", "inner: setup"),
    ("ift.implicit.core", "_AutogradLinearization.__init__", "IFT backward: linearization (grad graph)"),
    ("ift.implicit.core", "_AutogradLinearization.vjp_x", "IFT backward: Hessian-vector products"),
    ("ift.implicit.core", "_AutogradLinearization.vjp_params", "IFT backward: VJP to the params"),
    ("ift.implicit.linear_solvers", "LinearSolver.solve", "IFT backward: CG and preconditioner"),
    ("ift.savi.module", "SAVIModule.training_step", "outer forward (encoder, ELBO, logging)"),
]


def profile(step, seeds: list[int]) -> dict:
    """Exclusive wall seconds per PROFILE_POINTS label over the steps; the rest is outer backward,
    Adam and the Python between the points."""
    import importlib

    totals: dict[str, float] = collections.defaultdict(float)
    stack: list[float] = []

    def wrap(fn, label):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            stack.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed, nested = time.perf_counter() - start, stack.pop()
                totals[label] += elapsed - nested
                if stack:
                    stack[-1] += elapsed
        return timed

    for module_name, attr, label in PROFILE_POINTS:
        owner = sys.modules.get(module_name) or importlib.import_module(module_name)
        *path, name = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        setattr(owner, name, wrap(getattr(owner, name), label))
    total = 0.0
    for seed in seeds:
        stack.append(0.0)
        wall = step(seed)["wall"]
        total += wall
        totals["rest: outer backward, Adam, Python"] += wall - stack.pop()
    return {"total_s": total, "steps": len(seeds), "parts": dict(totals)}


# --- parent ----------------------------------------------------------------------------------------
def training_data(root: Path, n: int):
    import torch

    if (root / "train-images-idx3-ubyte.gz").is_file() or (root / "train-images-idx3-ubyte").is_file():
        from ift.data.idx import find_idx_file, read_idx

        images = read_idx(find_idx_file(root, "train-images-idx3-ubyte", "MNIST")).float().div(255)
        from ift.bench import relative

        return images[:n].unsqueeze(1), f"MNIST training images ({relative(root)})"
    from ift.savi.model import mlp

    gen = torch.Generator().manual_seed(0)
    teacher = mlp([8, 64, 784])
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (1.5 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.5))
        x = torch.sigmoid(teacher(torch.randn(n, 8, generator=gen)))
        x = (x + 0.05 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    return x.reshape(n, 1, 28, 28), "synthetic MNIST-shaped data (random teacher decoder; no MNIST files found)"


def warm_state(args, path: Path) -> str:
    """Train mode vae for --train-steps steps; save its state and one batch for the workers."""
    import torch

    from ift.savi.module import SAVIModule

    torch.set_num_threads(args.threads)
    data, source = training_data(args.data_root, 20000)
    torch.manual_seed(0)
    module = SAVIModule(input_shape=[1, 28, 28], mode="vae")
    opt = torch.optim.Adam(module.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(args.train_steps):
            loss = module.training_step((data[torch.randint(0, len(data) - 1000, (128,), generator=gen)], None), 0)
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.save({"state": module.state_dict(), "x": data[-args.batch_size:].clone()}, path)
    return source


class Worker:
    def __init__(self, src: Path, mode: str, state: Path, threads: int):
        cmd = [sys.executable, __file__, "--worker", str(src), mode, str(state), str(threads)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=src.parent)

    def ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.proc.args[3:5]} died (exit {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main() -> None:
    from ift import bench

    parser = bench.parser(__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-root", type=Path, default=MNIST)
    parser.add_argument("--old-tree", type=Path, default=None,
                        help="a source tree (e.g. `git archive a7a71c6 | tar -x -C DIR`) whose savi_ift is timed too")
    parser.add_argument("--profile", action="store_true", help="also profile savi_ift of each tree")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="modes of this tree to time (vae is always timed: the ratios' reference)")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.train_steps, args.profile_steps = 1, 20, 1
    if args.old_tree is not None and not (args.old_tree / "src" / "ift" / "savi" / "module.py").is_file():
        parser.error(f"--old-tree {args.old_tree} has no src/ift/savi/module.py; export it with "
                     "`git archive a7a71c6 | tar -x -C DIR`")
    import torch

    torch.set_num_threads(args.threads)  # the environment line then states the workers' thread count
    run = bench.Run("savi_step_time", SOURCES, args)
    modes = [m for m in MODES if (m == "vae" or m in args.modes) and (REPO / "configs" / "model" / f"{m}.yaml").is_file()]
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state.pt"
        data_source = warm_state(args, state)
        cases = {m: (REPO / "src", m) for m in modes}
        if args.old_tree is not None:
            cases["savi_ift (old tree)"] = (args.old_tree.resolve() / "src", "savi_ift")
        workers = {name: Worker(src, mode, state, args.threads) for name, (src, mode) in cases.items()}
        try:
            records = {name: [] for name in cases}
            names = list(cases)
            for rnd in range(1 + args.repeats):  # round 0: warm-up, not recorded
                for name in names if rnd % 2 else names[::-1]:
                    reply = workers[name].ask({"cmd": "step", "seed": rnd})
                    if rnd:
                        records[name].append(reply)
                print(f"round {rnd}: " + ", ".join(f"{n} {r[-1]['wall'] * 1e3:.0f} ms" for n, r in records.items() if r),
                      flush=True)
            profiles = {}
            if args.profile:
                for name in [n for n in names if cases[n][1] == "savi_ift"]:
                    profiles[name] = workers[name].ask({"cmd": "profile", "seeds": list(range(100, 100 + args.profile_steps))})
        finally:
            for w in workers.values():
                w.close()
    write(run, args, records, profiles, data_source)


def fixed_steps(name: str) -> bool:
    """Whether the mode's config runs a fixed number of inner steps (tol 0: no stationarity test)."""
    from omegaconf import OmegaConf

    path = REPO / "configs" / "model" / f"{name}.yaml"
    return path.is_file() and OmegaConf.load(path).get("inner", {}).get("tol", None) == 0


def write(run, args, records: dict, profiles: dict, data_source: str) -> None:
    from ift import bench

    vae = [r["wall"] for r in records["vae"]]
    rows, payload = [], {"data": data_source, "modes": {}, "profiles": profiles}
    for name, recs in records.items():
        wall = [r["wall"] for r in recs]
        spread = bench.Spread.of(wall)
        ratio = bench.Spread.of([w / v for w, v in zip(wall, vae)])
        last = {k: [r[k] for r in recs if k in r] for k in recs[0]}
        fixed = fixed_steps(name)
        nonstat = max(last.get("nonstationary_frac", [0.0]))
        stat_max = max(last.get("stationarity_max", [0.0]))
        conv = all(last.get("backward_converged", [True]))
        back = statistics.mean(last["backward_iterations"]) if "backward_iterations" in last else None
        inner = statistics.mean(last["inner_iterations"]) if "inner_iterations" in last else None
        rows.append([name, spread.fmt(".0f", 1e3), ratio.fmt(".1f"),
                     "-" if inner is None else f"{inner:.2f}",
                     "-" if inner is None else ("fixed steps" if fixed else f"{nonstat:g}"),
                     "-" if inner is None else f"{stat_max:.1e}",
                     "-" if back is None else f"{back:.2f}", "-" if back is None else ("yes" if conv else "NO")])
        payload["modes"][name] = {"wall_s": wall, "cpu_s": [r["cpu"] for r in recs], "ratio_to_vae": ratio.to_dict(),
                                  "step": spread.to_dict(), "records": recs}
    md = [f"# SAVI training step time at MNIST size (batch {args.batch_size}, {args.threads} thread(s))", "",
          f"Data: {data_source}; VAE trained amortized for {args.train_steps} steps, then every timed step "
          f"starts from that state (default model configs: inner tol 1e-5, 4 inner draws). "
          f"{args.repeats} interleaved rounds after one warm-up; median [min, max].", "",
          bench.table(["mode", "step ms", "/ vae", "inner iters", "nonstationary", "max stationarity",
                       "backward iters", "backward converged"], rows)]
    if "savi_ift (old tree)" in records:
        old = [r["wall"] for r in records["savi_ift (old tree)"]]
        new = [r["wall"] for r in records["savi_ift"]]
        speedup = bench.Spread.of([o / n for o, n in zip(old, new)])
        old_tree = bench.relative(args.old_tree)
        payload["savi_ift_speedup_vs_old_tree"] = {**speedup.to_dict(), "old_tree": old_tree}
        md += ["", f"savi_ift speed-up over the old tree ({old_tree}), per round: **{speedup.fmt('.2f')}x**."]
    for name, prof in profiles.items():
        total = prof["total_s"]
        parts = sorted(prof["parts"].items(), key=lambda kv: -kv[1])
        md += ["", f"## Where the time of a {name} step goes ({prof['steps']} steps, {total / prof['steps'] * 1e3:.0f} ms "
               "per step; exclusive wall time of each part as a fraction of the same steps)", "",
               bench.table(["part", "share", "ms per step"],
                           [[k, f"{v / total:.1%}", f"{v / prof['steps'] * 1e3:.1f}"] for k, v in parts])]
    run.write(payload, "\n".join(md))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        main()
