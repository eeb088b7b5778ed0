"""Memory and speed of one SAVI training step against K inner steps: unrolled, checkpointed,
reversible and implicit (IFT).

For each K and each mode (`savi_unrolled`, `savi_checkpointed` with round(sqrt(K)) segments,
`savi_reversible`, `savi_ift`, and `vae` as the K = 0 reference), one training step (forward with
the inner loop + backward) of the Dai et al. VAE on MNIST-sized inputs (784 pixels, latent 8,
hidden 128-128, 4 inner noise draws) at a fixed batch:

- saved_bytes: bytes of tensors autograd holds for backward when backward starts
  (`saved_tensors_hooks`, each storage counted once); peak_saved_bytes: the most held at any moment
  of forward and backward (the hooks stay on during backward). Hooks do not see what non-reentrant
  checkpointing keeps (it saves behind hooks of its own), hence:
- tensor_bytes_at_backward / tensor_peak_bytes: bytes of all tensors created in the step (not the
  weights or the data) alive when backward starts / at the peak of forward and backward, counted
  from every op's outputs by a `TorchDispatchMode` (deterministic; on CPU the analogue of CUDA's
  allocated bytes);
- backward_peak_bytes: memory in use at the peak of backward above what the process held before
  the step: on CUDA from `torch.cuda.max_memory_allocated` (reset when backward starts), on CPU
  from the kernel's peak RSS (VmHWM, reset through /proc/self/clear_refs when backward starts);
  each record runs in a fresh interpreter;
- step_time_s: wall time of one step without the hooks, the modes of one K interleaved in one
  process (`ift.bench.interleaved`), with the per-round ratio to the unrolled step.

The byte counts are deterministic (not timings) and `--memory-only` produces them alone. All modes
run exactly K steps (tol = 0) of the same first-order loop (SGD, momentum 0.5, lr 0.1, clip 5,
per-example backtracking; the reversible mode needs it, and K up to 200 is a first-order regime).

    python benchmarks/savi_memory_speed.py                 # K 5..200, batch 128: ~25 min on 1 CPU thread
    python benchmarks/savi_memory_speed.py --memory-only   # the byte counts alone, ~12 min
    python benchmarks/savi_memory_speed.py --quick         # smoke run, to a temporary folder
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ift import bench
from ift.savi.module import SAVIModule

SOURCES = ["src/ift/savi", "src/ift/implicit/minimize.py", "src/ift/implicit/reversible.py",
           "src/ift/implicit/core.py", "src/ift/implicit/linear_solvers.py"]
MODES = ("savi_unrolled", "savi_checkpointed", "savi_reversible", "savi_ift")
SHORT = {"savi_unrolled": "unrolled", "savi_checkpointed": "checkpointed", "savi_reversible": "reversible",
         "savi_ift": "IFT", "vae": "vae"}
MIB = 2**20


def make_module(mode: str, steps: int, device: torch.device, side: int) -> SAVIModule:
    torch.manual_seed(0)
    module = SAVIModule(input_shape=[1, side, side], mode=mode, latent_dim=8, hidden=[128, 128],
                        gamma={"init": 0.02, "learn": True},
                        inner={"method": "sgd", "lr": 0.1, "momentum": 0.5, "clip": 5.0, "eta": 1.0,
                               "max_iter": steps, "tol": 0.0, "nonstationary": "ift"})  # a fixed budget, no stationarity test
    return module.to(device)


def data(batch: int, side: int, device: torch.device) -> torch.Tensor:
    return torch.rand(batch, 1, side, side, generator=torch.Generator().manual_seed(1)).to(device)


class _StorageCounter:
    """Bytes of the storages counted, each until its last counted reference is freed; `peak` is the
    maximum."""

    def __init__(self) -> None:
        self.live: dict[object, list[int]] = {}
        self.current = self.peak = 0

    def _count(self, tensor: torch.Tensor, key, nbytes: int) -> None:
        if key in self.live:
            self.live[key][0] += 1
        else:
            self.live[key] = [1, nbytes]
            self.current += nbytes
            self._new_level()
        weakref.finalize(tensor, self._release, key)

    def _new_level(self) -> None:
        self.peak = max(self.peak, self.current)

    def _release(self, key) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[0] -= 1
            if entry[0] == 0:
                self.current -= entry[1]
                del self.live[key]


class PeakSavedBytes(_StorageCounter):
    """Running total of storages saved for backward (the `pack` hook of saved_tensors_hooks); `peak`
    is the maximum over forward and backward."""

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        self._count(tensor, (str(tensor.device), storage.data_ptr()), storage.nbytes())
        return tensor


class LiveTensorBytes(_StorageCounter, TorchDispatchMode):
    """Bytes of all tensor storages alive, forward and backward, from every op's outputs (a
    deterministic CPU analogue of CUDA's allocated bytes, which saved_tensors_hooks cannot give:
    non-reentrant checkpointing stores its segment inputs and recomputed tensors behind hooks of its
    own). Storages alive before the step (weights, data) are not counted. `mark()` starts a new
    peak (the backward's) from the current level."""

    def __init__(self, existing: list[torch.Tensor]) -> None:
        TorchDispatchMode.__init__(self)
        _StorageCounter.__init__(self)
        self.skip = {t.untyped_storage().data_ptr() for t in existing}
        self.marked_peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage().data_ptr()
                if key != 0 and key not in self.skip:
                    self._count(t, key, t.untyped_storage().nbytes())
        return out

    def _new_level(self) -> None:
        super()._new_level()
        self.marked_peak = max(self.marked_peak, self.current)

    def mark(self) -> None:
        self.marked_peak = self.current


def _proc_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


class BackwardPeak:
    """Memory in use at the peak of backward, above the level `start()` recorded before the step."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        self.base = torch.cuda.memory_allocated() if self.cuda else _proc_kb("VmRSS")

    def backward_begins(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def peak(self) -> int:
        top = torch.cuda.max_memory_allocated() if self.cuda else _proc_kb("VmHWM")
        return max(top - self.base, 0)


def measure_memory(mode: str, steps: int, batch: int, side: int, device: torch.device) -> dict:
    """One training step in this (fresh) process with the hooks on: the byte counts."""
    module = make_module(mode, steps, device, side)
    x = data(batch, side, device)
    peak_mem = BackwardPeak(device)
    peak_mem.start()
    counter = PeakSavedBytes()
    tensors = LiveTensorBytes([x, *module.parameters(), *module.buffers()])
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t), tensors:
        loss = module.training_step((x, None), 0)
        held, alive = counter.current, tensors.current
        peak_mem.backward_begins()
        tensors.mark()
        loss.backward()
    bench.synchronize(str(device))
    info = module.solves.pop().get("inner")
    return {"mode": mode, "steps": steps, "batch_size": batch, "saved_bytes": held,
            "peak_saved_bytes": counter.peak, "tensor_bytes_at_backward": alive, "tensor_peak_bytes": tensors.peak,
            "backward_tensor_peak_bytes": tensors.marked_peak, "backward_peak_bytes": peak_mem.peak(),
            "segments": module.inner_cfg.checkpoint_segments,
            "inner_steps_taken": None if info is None else float(info.iterations.float().mean())}


def measure_time(steps: int, batch: int, side: int, repeats: int, device: torch.device) -> dict:
    """Step times of all modes at one K, interleaved in this process (no hooks)."""
    x = data(batch, side, device)
    modules = {mode: make_module(mode, steps, device, side) for mode in MODES}

    def step(module):
        def run():
            module.zero_grad(set_to_none=True)
            module.training_step((x, None), 0).backward()
        return run

    times = bench.interleaved({m: step(mod) for m, mod in modules.items()}, repeats=repeats, device=str(device))
    return {m: {**times[m].to_dict(), "vs_unrolled": bench.ratio(times[m], times["savi_unrolled"]).to_dict()}
            for m in MODES}


def in_subprocess(args, *single: str) -> dict:
    cmd = [sys.executable, __file__, "--single", *single, "--batch-size", str(args.batch_size),
           "--side", str(args.side), "--repeats", str(args.repeats), "--device", args.device,
           "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(single)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


METRICS = (("saved_bytes", "held for backward (hooks)"), ("tensor_bytes_at_backward", "alive at backward (tensors)"),
           ("tensor_peak_bytes", "peak alive (tensors)"))


def markdown(records: list[dict], times: dict, args) -> str:
    by = {(r["mode"], r["steps"]): r for r in records}
    ks = sorted({r["steps"] for r in records if r["mode"] != "vae"})
    head = ["K"] + [f"{SHORT[m]} {name} MiB" for key, name in METRICS for m in MODES]
    rows = [[k] + [f"{by[(m, k)][key] / MIB:.2f}" for key, _ in METRICS for m in MODES] for k in ks]
    text = ["## Memory of one step (deterministic byte counts)\n",
            "held for backward (hooks): bytes saved for backward when backward starts, from "
            "saved_tensors_hooks (blind to non-reentrant checkpointing, which saves behind hooks of its own); "
            "alive at backward / peak alive (tensors): bytes of all tensors created in the step and alive "
            "when backward starts / at the peak of forward and backward (a dispatch-mode count).\n",
            bench.table(head, rows)]
    vae = by.get(("vae", 0))
    if vae:
        text.append("\nReference `vae` (K = 0): " + ", ".join(f"{name} {vae[key] / MIB:.2f} MiB" for key, name in METRICS)
                    + ".\n")
    k_top = max(ks)
    names = ("savi_reversible", "savi_unrolled", "savi_checkpointed")
    if all((m, k_top) in by for m in names):
        rev, unr, ckp = (by[(m, k_top)] for m in names)
        lines = [f"\nReversible against unrolled and checkpointed at K = {k_top}:"]
        for key, name in METRICS:
            lines.append(f"- {name}: {rev[key] / unr[key]:.4f} of unrolled's, {rev[key] / ckp[key]:.4f} of "
                         f"checkpointed's")
        if vae:  # the outer ELBO's graph is common to all modes: what the inner loop adds
            key = "saved_bytes"
            added = {m: by[(m, k_top)][key] - vae[key] for m in names}
            lines.append(f"- held for backward (hooks) beyond the `vae` step's: reversible "
                         f"{added['savi_reversible'] / MIB:.3f} MiB, unrolled {added['savi_unrolled'] / MIB:.2f} MiB, "
                         f"checkpointed {added['savi_checkpointed'] / MIB:.3f} MiB (hooks see none of its storage)")
        text.append("\n".join(lines) + "\n")
    if times:
        head = ["K"] + [f"{SHORT[m]} step s" for m in MODES] + [f"{SHORT[m]} / unrolled" for m in MODES[1:]] \
            + [f"{SHORT[m]} backward peak MiB" for m in MODES]
        rows = []
        for k in ks:
            t = times[str(k)]
            rows.append([k] + [f"{t[m]['median_s']:.3f}" for m in MODES]
                        + [bench.Spread(**t[m]["vs_unrolled"]).fmt() for m in MODES[1:]]
                        + [f"{by[(m, k)]['backward_peak_bytes'] / MIB:.1f}" for m in MODES])
        text += [f"\n## Step time (median of {args.repeats}, interleaved; ratio: median [min, max] of the "
                 "per-round ratios) and memory at the peak of backward (above the process before the step, "
                 f"{'CUDA allocated' if args.device.startswith('cuda') else 'peak RSS'})\n",
                 bench.table(head, rows)]
    else:
        text.append("\nTimings and backward peaks not measured in this run (`--memory-only`).\n")
    return "\n".join(text)


def figure(records: list[dict], times: dict, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, mode in enumerate(MODES):
        rows = sorted((r for r in records if r["mode"] == mode), key=lambda r: r["steps"])
        ks = [r["steps"] for r in rows]
        ax_mem.loglog(ks, [r["tensor_peak_bytes"] / MIB for r in rows], "o-", color=f"C{i}",
                      label=f"{SHORT[mode]}: peak")
        ax_mem.loglog(ks, [r["tensor_bytes_at_backward"] / MIB for r in rows], "s--", color=f"C{i}", alpha=0.6,
                      label=f"{SHORT[mode]}: when backward starts")
        if times:
            ax_time.loglog(ks, [times[str(k)][mode]["median_s"] for k in ks], "o-", color=f"C{i}", label=SHORT[mode])
    ax_mem.set_xlabel("inner steps K")
    ax_mem.set_ylabel("MiB of tensors alive (created in the step)")
    ax_mem.set_title(f"memory of one training step (batch {args.batch_size}, {args.side}x{args.side} inputs)", fontsize=9)
    ax_mem.legend(fontsize=7)
    ax_time.set_xlabel("inner steps K")
    ax_time.set_ylabel("seconds per training step (forward + backward)")
    ax_time.set_title(f"step time ({args.device}, {args.threads} thread(s))", fontsize=9)
    if times:
        ax_time.legend(fontsize=8)
    else:
        ax_time.text(0.5, 0.5, "not measured in this run\n(--memory-only)", ha="center", va="center",
                     transform=ax_time.transAxes)
    for ax in (ax_mem, ax_time):
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig


def main() -> None:
    parser = bench.parser(__doc__)
    parser.add_argument("--steps", type=int, nargs="+", default=None, help="K values (default 5 10 20 50 100 200)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 128 (--quick: 16)")
    parser.add_argument("--side", type=int, default=28, help="image side (28: MNIST size)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared machine)")
    parser.add_argument("--memory-only", action="store_true", help="the byte counts only, no timings")
    parser.add_argument("--single", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.steps = args.steps or ([5, 20] if args.quick else [5, 10, 20, 50, 100, 200])
    args.batch_size = args.batch_size or (16 if args.quick else 128)
    if args.quick:
        args.repeats = min(args.repeats, 2)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.single:  # one measurement in this fresh process, printed as JSON for the parent
        kind, *rest = args.single
        if kind == "memory":
            out = measure_memory(rest[0], int(rest[1]), args.batch_size, args.side, device)
        else:
            out = measure_time(int(rest[0]), args.batch_size, args.side, args.repeats, device)
        print(json.dumps(out))
        return
    run = bench.Run("savi_memory_speed", SOURCES, args, device=args.device)
    records = [in_subprocess(args, "memory", "vae", "0")]
    times: dict[str, dict] = {}
    for k in args.steps:
        for mode in MODES:
            records.append(in_subprocess(args, "memory", mode, str(k)))
            r = records[-1]
            print(f"{mode:18s} K={k:4d} saved={r['saved_bytes'] / MIB:9.2f} MiB alive at backward="
                  f"{r['tensor_bytes_at_backward'] / MIB:9.2f} MiB peak={r['tensor_peak_bytes'] / MIB:9.2f} MiB",
                  flush=True)
        if not args.memory_only:
            times[str(k)] = in_subprocess(args, "time", str(k))
            print("   step s: " + ", ".join(f"{SHORT[m]} {times[str(k)][m]['median_s']:.3f}" for m in MODES), flush=True)
    text = markdown(records, times, args)
    title = (f"# SAVI: memory and speed of one training step against K\n\n{args.device}, batch {args.batch_size}, "
             f"{args.side}x{args.side} inputs, latent 8, hidden 128-128, 4 inner draws, {args.threads} thread(s); "
             "inner loop SGD lr 0.1, momentum 0.5, clip 5, K fixed steps; checkpointed: round(sqrt(K)) segments.\n\n")
    run.write({"records": records, "times": times, "memory_only": args.memory_only}, title + text,
              figures={"savi_memory_speed.png": figure(records, times, args)})
    print(text)


if __name__ == "__main__":
    main()
