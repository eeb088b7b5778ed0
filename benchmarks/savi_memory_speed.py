"""Memory and speed of one SAVI training step: unrolled vs implicit (IFT), against K inner steps.

For each K and each mode (`savi_unrolled`, `savi_ift`, and `vae` as the K = 0 reference), one
training step (forward with the inner loop + backward) of the Dai et al. VAE at a fixed batch,
measured side by side in one run (modes interleaved for every K):

- saved_tensor_bytes: bytes of tensors autograd holds for backward when backward starts
  (`ift.telemetry.SavedTensorCounter.live_bytes`);
- peak_mem_bytes: on CUDA, `torch.cuda.max_memory_allocated` during the step; on CPU, the growth of
  the process's peak RSS during the first step (each record runs in a fresh interpreter, so one
  record's peak does not hide the next);
- step_time_s: median wall time over --repeats steps (after one warm-up step).

Both refinement modes run exactly K inner steps (tol = 0) with the same inner optimiser.

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
from pathlib import Path

import torch

from ift.savi.module import SAVIModule
from ift.telemetry import SavedTensorCounter

RESULTS = Path(__file__).parent / "results"


def make_module(mode: str, steps: int, device: torch.device) -> SAVIModule:
    torch.manual_seed(0)
    module = SAVIModule(input_shape=[1, 8, 8], mode=mode, latent_dim=8, hidden=[128, 128],
                        gamma={"init": 0.02, "learn": True},
                        inner={"optimizer": "sgd", "lr": 0.1, "momentum": 0.5, "clip": 5.0, "eta": 1.0,
                               "steps": steps, "tol": 0.0})
    return module.to(device)


def one_step(module: SAVIModule, x: torch.Tensor) -> int:
    """Forward + backward of one training step; returns the bytes held for backward."""
    module.zero_grad(set_to_none=True)
    with SavedTensorCounter() as counter:
        loss = module.training_step((x, None), 0)
    held = counter.live_bytes
    loss.backward()
    return held


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(mode: str, steps: int, batch_size: int, repeats: int, device: torch.device) -> dict:
    module = make_module(mode, steps, device)
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
        saved = one_step(module, x)
        sync(device)
        times.append(time.perf_counter() - start)
    return {"mode": mode, "steps": steps, "batch_size": batch_size, "saved_tensor_bytes": saved,
            "peak_mem_bytes": max(int(peak), 0), "step_time_s": statistics.median(times), "device": str(device)}


def measure_in_subprocess(mode: str, steps: int, args) -> dict:
    cmd = [sys.executable, __file__, "--single", mode, str(steps), "--batch-size", str(args.batch_size),
           "--repeats", str(args.repeats), "--device", args.device, "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def markdown(records: list[dict]) -> str:
    by = {(r["mode"], r["steps"]): r for r in records}
    ks = sorted({r["steps"] for r in records if r["mode"] != "vae"})
    vae = by.get(("vae", 0))
    lines = [
        "| K | unrolled saved MiB | IFT saved MiB | saved ratio | unrolled peak MiB | IFT peak MiB | "
        "unrolled step s | IFT step s | time ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    mib = 2**20
    for k in ks:
        u, i = by[("savi_unrolled", k)], by[("savi_ift", k)]
        lines.append(
            f"| {k} | {u['saved_tensor_bytes'] / mib:.2f} | {i['saved_tensor_bytes'] / mib:.2f} | "
            f"{u['saved_tensor_bytes'] / i['saved_tensor_bytes']:.1f}x | {u['peak_mem_bytes'] / mib:.1f} | "
            f"{i['peak_mem_bytes'] / mib:.1f} | {u['step_time_s']:.3f} | {i['step_time_s']:.3f} | "
            f"{u['step_time_s'] / i['step_time_s']:.2f}x |")
    if vae:
        lines.append(f"\nReference `vae` (K = 0): saved {vae['saved_tensor_bytes'] / mib:.2f} MiB, "
                     f"peak {vae['peak_mem_bytes'] / mib:.1f} MiB, step {vae['step_time_s']:.4f} s.")
    return "\n".join(lines) + "\n"


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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.single:  # one record in this fresh process, printed as JSON for the parent
        print(json.dumps(measure(args.single[0], int(args.single[1]), args.batch_size, args.repeats, device)))
        return
    records = [measure_in_subprocess("vae", 0, args)]
    for k in args.steps:
        for mode in ("savi_unrolled", "savi_ift"):
            records.append(measure_in_subprocess(mode, k, args))
            r = records[-1]
            print(f"{mode:14s} K={k:4d} saved={r['saved_tensor_bytes'] / 2**20:8.2f} MiB "
                  f"peak={r['peak_mem_bytes'] / 2**20:8.1f} MiB time={r['step_time_s']:.3f} s", flush=True)
    meta = {"torch": torch.__version__, "device": str(device), "platform": platform.platform(),
            "threads": torch.get_num_threads(), "batch_size": args.batch_size}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "records": records}, indent=2))
    table = markdown(records)
    args.out.with_suffix(".md").write_text(
        f"Command: `python benchmarks/savi_memory_speed.py` ({meta['device']}, torch {meta['torch']}, "
        f"batch {args.batch_size}, {meta['threads']} threads)\n\n{table}")
    print(table)


if __name__ == "__main__":
    main()
