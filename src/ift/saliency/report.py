"""The SENS_max / INFD table of Yeh et al. (Table 4 setting) for a trained classifier, written as
JSON + markdown, plus a PNG grid of saliency maps.

Table 4 setting ("global"): every explanation is compared as the attribution ``x * Phi`` (SHAP and
Square are attributions already) under square-removal perturbations. Noisy Baseline is a local
explanation and is evaluated under its own noisy-baseline perturbation. With ``local=True`` the
gradient-type methods are also evaluated locally (raw ``Phi``, noisy-baseline perturbation), the
paper's local table.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ift.saliency.explanations import METHODS, make_explanation, to_global
from ift.saliency.measures import infidelity, max_sensitivity

LOCAL_METHODS = ("Grad", "Grad-SG", "IG", "IG-SG", "GBP", "GBP-SG", "NB")


@dataclass
class SaliencyConfig:
    """Sample counts and radii; the defaults are the paper's (Appendix B.1)."""

    methods: Sequence[str] = METHODS
    sens_radius: float = 0.1
    sens_samples: int = 50
    infd_samples: int = 1000  # noisy-baseline draws; square removal uses every square
    sg_radius: float = 0.2
    sg_samples: int = 200
    ig_steps: int = 10
    shap_samples: int = 2000
    nb_samples: int = 20000
    nb_sigma: float = 0.2
    square_sizes: Sequence[int] = (1, 10)
    local: bool = False
    max_batch: int = 4096
    seed: int = 0

    @classmethod
    def from_dict(cls, cfg: dict) -> "SaliencyConfig":
        """From eval settings: ``saliency_<field>`` keys (e.g. ``saliency_sens_samples``); keys of
        other evaluations are ignored, an unknown ``saliency_*`` key raises."""
        own = {k[len("saliency_"):]: v for k, v in cfg.items() if k.startswith("saliency_")}
        own.pop("examples", None)
        unknown = sorted(set(own) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown saliency settings {['saliency_' + k for k in unknown]}; allowed: "
                             f"{['saliency_' + k for k in cls.__dataclass_fields__] + ['saliency_examples']}")
        known = own
        out = cls(**known)
        bad = [m for m in out.methods if m not in METHODS]
        if bad:
            raise ValueError(f"saliency methods {bad} not in {METHODS}")
        return out


def evaluate_method(model: nn.Module, name: str, x: torch.Tensor, y: torch.Tensor, cfg: SaliencyConfig,
                    local: bool, refs: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, float], torch.Tensor]:
    """Per-example SENS_max and INFD of one method; returns (mean metrics, explanation of x)."""
    gen = torch.Generator(device=x.device).manual_seed(cfg.seed)
    expl = make_explanation(name, model, sg_radius=cfg.sg_radius, sg_samples=cfg.sg_samples, ig_steps=cfg.ig_steps,
                            shap_samples=cfg.shap_samples, nb_samples=cfg.nb_samples, nb_sigma=cfg.nb_sigma,
                            square_sizes=cfg.square_sizes, max_batch=cfg.max_batch, generator=gen)
    use_local = local or name == "NB"
    if not use_local:
        expl = to_global(expl)
    phi = expl(x, y)
    gen_m = torch.Generator(device=x.device).manual_seed(cfg.seed + 1)
    pert = "noisy_baseline" if use_local else "square"
    ref = refs[pert] if refs is not None else zero_explanation_infd(model, x, y, cfg, pert)
    if use_local:
        infd = infidelity(model, x, phi, "noisy_baseline", cfg.infd_samples, y, sigma=cfg.nb_sigma,
                          max_batch=cfg.max_batch, generator=gen_m)
    else:
        infd = infidelity(model, x, phi, "square", None, y, square_sizes=cfg.square_sizes, global_attribution=True,
                          max_batch=cfg.max_batch)
    sens = max_sensitivity(expl, x, cfg.sens_radius, cfg.sens_samples, y, max_batch=cfg.max_batch, generator=gen_m)
    metrics = {"sens_max": float(sens.mean()), "infd": float(infd.mean()),
               "sens_max_sem": float(sens.std() / len(sens) ** 0.5) if len(sens) > 1 else 0.0,
               "infd_sem": float(infd.std() / len(infd) ** 0.5) if len(infd) > 1 else 0.0,
               "perturbation": "noisy_baseline" if use_local else "square",
               "infd_rel": float((infd / ref.clamp_min(1e-30)).mean()), "infd_zero": float(ref.mean())}
    return metrics, phi


def zero_explanation_infd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: SaliencyConfig,
                          perturbation: str) -> torch.Tensor:
    """INFD of the zero explanation, ``E[(f(x) - f(x - I))^2]``, on the same perturbations as
    ``evaluate_method``: the scale of the score changes, against which INFD is read (INFD is not
    invariant to rescaling f, and a robust model's logits move less)."""
    zero = torch.zeros_like(x)
    if perturbation == "square":
        return infidelity(model, x, zero, "square", None, y, square_sizes=cfg.square_sizes, max_batch=cfg.max_batch)
    gen_m = torch.Generator(device=x.device).manual_seed(cfg.seed + 1)
    return infidelity(model, x, zero, "noisy_baseline", cfg.infd_samples, y, sigma=cfg.nb_sigma,
                      max_batch=cfg.max_batch, generator=gen_m)


def saliency_table(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   cfg: SaliencyConfig) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """``({"global"|"local": {method: metrics}}, {method: maps of x})`` for the examples ``(x, y)``.

    Each method also gets ``infd_rel``: per-example INFD over the zero explanation's INFD
    (``1 - R^2`` of the best scaled explanation), averaged over examples.
    """
    model.eval()
    ref = {p: zero_explanation_infd(model, x, y, cfg, p) for p in ("square", "noisy_baseline")}  # shared
    tables: dict[str, dict] = {"global": {}}
    maps: dict[str, torch.Tensor] = {}

    def add(setting, name, local):
        metrics, phi = evaluate_method(model, name, x, y, cfg, local=local, refs=ref)
        tables[setting][name] = metrics
        return phi

    for name in cfg.methods:
        maps[name] = add("global", name, local=False)
    if cfg.local:
        tables["local"] = {}
        for name in cfg.methods:
            if name in LOCAL_METHODS and name != "NB":
                add("local", name, local=True)
    return tables, maps


def flatten_metrics(tables: dict[str, dict], prefix: str = "saliency") -> dict[str, float]:
    """``saliency/<method>/sens_max``, ``saliency/<method>/infd`` (Table 4 setting) and
    ``saliency/local/<method>/...`` for the local table."""
    out = {}
    for setting, rows in tables.items():
        base = prefix if setting == "global" else f"{prefix}/{setting}"
        for method, m in rows.items():
            for key in ("sens_max", "infd"):
                out[f"{base}/{method}/{key}"] = m[key]
    return out


def markdown_table(tables: dict[str, dict], columns: dict[str, dict[str, dict]] | None = None) -> str:
    """Markdown of one model's tables, or of several (``columns = {model_name: tables}``) side by side."""
    columns = columns or {"": tables}
    lines = []
    for setting in next(iter(columns.values())):
        names = list(columns)
        head = "| Method | " + " | ".join(f"{n} SENS_max | {n} INFD | {n} INFD/INFD(0)".strip() for n in names) + " |"
        lines += [f"**{setting}** ({'x*Phi, square removal; NB: noisy baseline' if setting == 'global' else 'Phi, noisy baseline'})",
                  "", head, "|---" * (1 + 3 * len(names)) + "|"]
        for method in next(iter(columns.values()))[setting]:
            cells = []
            for n in names:
                m = columns[n][setting][method]
                cells += [f"{m['sens_max']:.3g} ± {m['sens_max_sem']:.2g}", f"{m['infd']:.3g} ± {m['infd_sem']:.2g}",
                          f"{m['infd_rel']:.3g}"]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        for pert in dict.fromkeys(m["perturbation"] for m in next(iter(columns.values()))[setting].values()):
            zero = []
            for n in names:
                ref = next(m["infd_zero"] for m in columns[n][setting].values() if m["perturbation"] == pert)
                zero.append(f"| - | {ref:.3g} | 1")
            lines.append(f"| zero explanation, {pert} (E[df^2]) " + " ".join(zero) + " |")
        lines.append("")
    return "\n".join(lines)


def save_maps_png(x: torch.Tensor, maps: dict[str, torch.Tensor], path: Path, n_rows: int = 4) -> None:
    """Grid: input then each method's map (channel sum, zero mean / unit variance, as the paper)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows = min(n_rows, x.shape[0])
    names = list(maps)
    fig, axes = plt.subplots(n_rows, 1 + len(names), figsize=(1.6 * (1 + len(names)), 1.6 * n_rows), squeeze=False)
    for r in range(n_rows):
        img = x[r].detach().cpu()
        axes[r, 0].imshow(img.permute(1, 2, 0).squeeze(-1), cmap="gray" if img.shape[0] == 1 else None)
        for c, name in enumerate(names, start=1):
            m = maps[name][r].detach().cpu().double().sum(0)
            m = (m - m.mean()) / m.std().clamp_min(1e-12)
            axes[r, c].imshow(m, cmap="bwr", vmin=-3, vmax=3)
    for c, title in enumerate(["input", *names]):
        axes[0, c].set_title(title, fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(tables: dict[str, dict], cfg: SaliencyConfig, out_dir: Path, name: str = "saliency",
                 extra: dict | None = None) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"config": asdict(cfg), "tables": tables, **(extra or {})}
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=2, default=list))
    (out_dir / f"{name}.md").write_text(markdown_table(tables) + "\n")
