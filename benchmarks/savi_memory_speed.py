"""Memory and speed of one SAVI training step: unrolled, checkpointed unrolled and implicit (IFT),
against K inner steps.

For each K and each mode (`savi_unrolled`, `savi_checkpointed` with round(sqrt(K)) segments,
`savi_ift`, and `vae` as the K = 0 reference), one training step (forward with the inner loop +
backward) of the Dai et al. VAE at a fixed batch, measured side by side in one run (modes
interleaved for every K):

- saved_tensor_bytes: bytes of tensors autograd holds for backward when backward starts (the
  reading of `ift.telemetry.SavedTensorCounter.live_bytes`, here from the counter below);
- peak_saved_bytes: the most bytes held for backward at any moment of forward AND backward
  (saved_tensors_hooks stay on during backward, each saved storage counted until freed): for the
  checkpointed mode this includes the segment recomputed in backward;
- peak_mem_bytes: on CUDA, `torch.cuda.max_memory_allocated` during the step; on CPU, the growth of
  the process's peak RSS during the first step (each record runs in a fresh interpreter, so one
  record's peak does not hide the next);
- step_time_s: median wall time over --repeats steps (after one warm-up step).

All refinement modes run exactly K inner steps (tol = 0) with the same first-order inner optimiser
(SGD, momentum 0.5, lr 0.1, clip 5; K up to 500 is a first-order regime: Newton stops after ~5
iterations at tolerance, see --optimizer newton for its own rows).

    python benchmarks/savi_memory_speed.py                      # K in 5..500, batch 128, ~3 min on CPU
    python benchmarks/savi_memory_speed.py --steps 5 50 --batch-size 32 --out /tmp/s.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import platform
import resource
import statistics
import time
import weakref
from pathlib import Path

import torch

from ift.savi.module import SAVIModule

RESULTS = Path(__file__).parent / "results"


def make_module(mode: str, steps: int, device: torch.device, optimizer: str) -> SAVIModule:
    torch.manual_seed(0)
    module = SAVIModule(input_shape=[1, 8, 8], mode=mode, latent_dim=8, hidden=[128, 128],
                        gamma={"init": 0.02, "learn": True},
                        inner={"optimizer": optimizer, "lr": 0.1, "momentum": 0.5, "clip": 5.0, "eta": 1.0,
                               "steps": steps, "tol": 0.0},
                        ift={"nonstationary": "ift"})  # a fixed budget, no stationarity test
    return module.to(device)


class PeakSavedBytes:
    """Running total of storages saved for backward, each counted until its last saved reference
    is freed; `peak` is the maximum over forward and backward."""

    def __init__(self) -> None:
        self.live: dict[tuple[str, int], list[int]] = {}
        self.current = self.peak = 0

    def _release(self, key) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[0] -= 1
            if entry[0] == 0:
                self.current -= entry[1]
                del self.live[key]

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = (str(tensor.device), tensor.untyped_storage().data_ptr())
        if key in self.live:
            self.live[key][0] += 1
        else:
            self.live[key] = [1, tensor.untyped_storage().nbytes()]
            self.current += self.live[key][1]
            self.peak = max(self.peak, self.current)
        weakref.finalize(tensor, self._release, key)
        return tensor


def one_step(module: SAVIModule, x: torch.Tensor) -> tuple[int, int]:
    """Forward + backward of one training step; returns (bytes held when backward starts, peak)."""
    module.zero_grad(set_to_none=True)
    peak = PeakSavedBytes()
    # (only the innermost saved_tensors_hooks run, so this one counter does both readings)
    with torch.autograd.graph.saved_tensors_hooks(peak.pack, lambda t: t):
        loss = module.training_step((x, None), 0)
        held = peak.current
        loss.backward()
    return held, peak.peak


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(mode: str, steps: int, batch_size: int, repeats: int, device: torch.device, optimizer: str) -> dict:
    module = make_module(mode, steps, device, optimizer)
    x = torch.rand(batch_size, 1, 8, 8, generator=torch.Generator().manual_seed(1)).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else current_rss_bytes()
    one_step(module, x)  # also the warm-up
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        saved, peak_saved = one_step(module, x)
        sync(device)
        times.append(time.perf_counter() - start)
    return {"mode": mode, "steps": steps, "batch_size": batch_size, "saved_tensor_bytes": saved,
            "peak_saved_bytes": peak_saved, "peak_mem_bytes": max(int(peak), 0),
            "step_time_s": statistics.median(times), "device": str(device), "optimizer": optimizer,
            "segments": module.inner_cfg.checkpoint_segments}


def measure_in_subprocess(mode: str, steps: int, args) -> dict:
    cmd = [sys.executable, __file__, "--single", mode, str(steps), "--batch-size", str(args.batch_size),
           "--repeats", str(args.repeats), "--device", args.device, "--threads", str(args.threads),
           "--optimizer", args.optimizer]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


MODES = ("savi_unrolled", "savi_checkpointed", "savi_ift")
SHORT = {"savi_unrolled": "unrolled", "savi_checkpointed": "checkpointed", "savi_ift": "IFT"}


def markdown(records: list[dict]) -> str:
    by = {(r["mode"], r["steps"]): r for r in records}
    ks = sorted({r["steps"] for r in records if r["mode"] != "vae"})
    vae = by.get(("vae", 0))
    mib = 2**20
    head = ["K"] + [f"{SHORT[m]} saved MiB" for m in MODES] + [f"{SHORT[m]} peak saved MiB" for m in MODES] \
        + [f"{SHORT[m]} RSS peak MiB" for m in MODES] + [f"{SHORT[m]} step s" for m in MODES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for k in ks:
        rows = [by[(m, k)] for m in MODES]
        cells = [str(k)] + [f"{r['saved_tensor_bytes'] / mib:.2f}" for r in rows] \
            + [f"{r['peak_saved_bytes'] / mib:.2f}" for r in rows] + [f"{r['peak_mem_bytes'] / mib:.1f}" for r in rows] \
            + [f"{r['step_time_s']:.3f}" for r in rows]
        lines.append("| " + " | ".join(cells) + " |")
    if vae:
        lines.append(f"\nReference `vae` (K = 0): saved {vae['saved_tensor_bytes'] / mib:.2f} MiB, "
                     f"peak {vae['peak_mem_bytes'] / mib:.1f} MiB, step {vae['step_time_s']:.4f} s.")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, color in zip(MODES, ("C0", "C1", "C2")):
        rows = sorted((r for r in records if r["mode"] == mode), key=lambda r: r["steps"])
        ks = [r["steps"] for r in rows]
        ax.loglog(ks, [r["peak_saved_bytes"] / 2**20 for r in rows], "o-", color=color,
                  label=f"{SHORT[mode]}: peak held for backward")
        if mode == "savi_checkpointed":
            ax.loglog(ks, [r["saved_tensor_bytes"] / 2**20 for r in rows], "s--", color=color,
                      label=f"{SHORT[mode]}: held when backward starts")
    ax.set_xlabel("inner steps K")
    ax.set_ylabel("MiB saved for backward")
    ax.set_title("SAVI training step: memory against K (CPU, batch 128)")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50, 100, 200, 500])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=RESULTS / "savi_memory_speed.json")
    parser.add_argument("--single", nargs=2, metavar=("MODE", "K"), help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: stable timings on a shared machine)")
    parser.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", "newton"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.single:  # one record in this fresh process, printed as JSON for the parent
        print(json.dumps(measure(args.single[0], int(args.single[1]), args.batch_size, args.repeats, device,
                                 args.optimizer)))
        return
    records = [measure_in_subprocess("vae", 0, args)]
    for k in args.steps:
        for mode in MODES:
            records.append(measure_in_subprocess(mode, k, args))
            r = records[-1]
            print(f"{mode:18s} K={k:4d} saved={r['saved_tensor_bytes'] / 2**20:8.2f} MiB "
                  f"peak saved={r['peak_saved_bytes'] / 2**20:8.2f} MiB "
                  f"peak={r['peak_mem_bytes'] / 2**20:8.1f} MiB time={r['step_time_s']:.3f} s", flush=True)
    meta = {"torch": torch.__version__, "device": str(device), "platform": platform.platform(),
            "threads": torch.get_num_threads(), "batch_size": args.batch_size, "optimizer": args.optimizer}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "records": records}, indent=2))
    table = markdown(records)
    args.out.with_suffix(".md").write_text(
        f"Command: `python benchmarks/savi_memory_speed.py` ({meta['device']}, torch {meta['torch']}, "
        f"batch {args.batch_size}, {meta['threads']} threads, inner optimiser {args.optimizer}; "
        f"checkpointed: round(sqrt(K)) segments)\n\n{table}")
    plot(records, args.out.with_suffix(".png"))
    print(table)


if __name__ == "__main__":
    main()
