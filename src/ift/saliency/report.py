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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ift.saliency.explanations import CONTROLS, METHODS, SG_GLOBAL_VARIANTS, make_explanation, square_attribution, to_global
from ift.saliency.measures import (PERTURBATIONS, SENS_NORMALISATIONS, infidelity_from_perturbations,
                                   max_sensitivities, noisy_baseline_perturbations, perturbation_drops,
                                   square_drops, square_infidelity, square_masks)

LOCAL_METHODS = ("Grad", "Grad-SG", "IG", "IG-SG", "GBP", "GBP-SG", "NB", "Constant")
# extra SENS_max variants from the same perturbations: the explanation compared (global x * Phi or
# local Phi) and whether y = x + delta is clipped to [0, 1]
SENS_VARIANTS = ("global", "global_clipped", "local", "local_clipped")
# keys of the eval.saliency node read by the eval hook (ClassifierModule.evaluate_extra), not by SaliencyConfig
EVAL_KEYS = ("enabled", "examples")


@dataclass
class SaliencyConfig:
    """Sample counts and radii; the defaults are the paper's (Appendix B.1).

    sens_normalize: one of ``SENS_NORMALISATIONS`` or a list of them; the first is ``sens_max``, every
        one is also reported as ``sens_max_<name>`` (all from the same samples).
    sg_global: the global SmoothGrad, ``"x_times_mean"`` (``x * mean Phi(x + d)``) or the authors'
        ``"mean_of_products"`` (``mean[(x + d) * Phi(x + d)]``).
    method_sens: per-method limits for costly explanations, ``{method: {"examples": m, "samples": k,
        "variants": [...]}}``: SENS on the first m examples with k draws (INFD still uses every example),
        only these ``sens_variants``.
    clip: SENS_max scores ``y = clip(x + delta, 0, 1)`` (valid pixels only) instead of ``x + delta``.
    sens_variants: also report SENS_max as ``sens_max_<variant>_<normalisation>`` for each of
        ``SENS_VARIANTS`` listed, from the same deltas (gradient-type methods only; SHAP, Square and
        NB have one form). ``local`` is SENS of Phi itself: the global x * Phi changes by delta * Phi
        even where Phi does not change, a floor that a linear model (constant Phi) exposes.
    per_example: keep the per-example values (``metrics["per_example"]``) for paired comparisons.
    """

    methods: Sequence[str] = METHODS
    sens_radius: float = 0.1
    sens_samples: int = 50
    sens_normalize: str | Sequence[str] = "input"
    infd_samples: int = 1000  # noisy-baseline draws; square removal uses every square
    sg_radius: float = 0.2
    sg_samples: int = 200
    sg_global: str = "x_times_mean"
    ig_steps: int = 10
    shap_samples: int = 2000
    nb_samples: int = 20000
    nb_sigma: float = 0.2
    square_sizes: Sequence[int] = (1, 10)
    local: bool = False
    max_batch: int = 4096
    seed: int = 0
    method_sens: dict = field(default_factory=dict)
    clip: bool = False
    sens_variants: Sequence[str] = ()
    per_example: bool = False

    def __post_init__(self):
        norms = self.normalizations
        bad = [n for n in norms if n not in SENS_NORMALISATIONS]
        if bad or not norms:
            raise ValueError(f"eval.saliency.sens_normalize={self.sens_normalize!r}: use one of {SENS_NORMALISATIONS} "
                             f"or a list of them")
        if self.sg_global not in SG_GLOBAL_VARIANTS:
            raise ValueError(f"eval.saliency.sg_global={self.sg_global!r}: use one of {SG_GLOBAL_VARIANTS}")
        bad = [v for v in self.sens_variants if v not in SENS_VARIANTS]
        if bad:
            raise ValueError(f"eval.saliency.sens_variants={list(self.sens_variants)!r}: use a list of {SENS_VARIANTS}")
        for method, lim in self.method_sens.items():
            counts = {k: v for k, v in lim.items() if k != "variants"}
            if (method not in METHODS + CONTROLS or not set(lim) <= {"examples", "samples", "variants"}
                    or any(int(v) < 1 for v in counts.values())
                    or any(v not in SENS_VARIANTS for v in lim.get("variants", ()))):
                raise ValueError(f"eval.saliency.method_sens[{method!r}]={lim!r}: keys must be methods of {METHODS} "
                                 f"with {{examples: m >= 1, samples: k >= 1, variants: subset of {SENS_VARIANTS}}}")

    @property
    def normalizations(self) -> tuple[str, ...]:
        return (self.sens_normalize,) if isinstance(self.sens_normalize, str) else tuple(self.sens_normalize)

    @classmethod
    def from_dict(cls, cfg: dict) -> "SaliencyConfig":
        """From the ``eval.saliency`` node (e.g. ``{"sens_samples": 50}``); its ``enabled`` and
        ``examples`` belong to the eval hook; an unknown key raises."""
        own = {k: v for k, v in dict(cfg or {}).items() if k not in EVAL_KEYS}
        unknown = sorted(set(own) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown saliency settings {['eval.saliency.' + k for k in unknown]}; allowed: "
                             f"{['eval.saliency.' + k for k in [*EVAL_KEYS, *cls.__dataclass_fields__]]}")
        if "method_sens" in own:
            own["method_sens"] = {m: dict(v) for m, v in dict(own["method_sens"]).items()}
        if "sens_variants" in own:
            own["sens_variants"] = list(own["sens_variants"])
        if "sens_normalize" in own and not isinstance(own["sens_normalize"], str):
            own["sens_normalize"] = list(own["sens_normalize"])
        out = cls(**own)
        bad = [m for m in out.methods if m not in METHODS + CONTROLS]
        if bad:
            raise ValueError(f"eval.saliency.methods {bad} not in {METHODS} (controls: {CONTROLS})")
        return out


def infidelity_cache(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: SaliencyConfig,
                     perturbations: Sequence[str] = PERTURBATIONS) -> dict[str, torch.Tensor]:
    """Score drops ``f(x) - f(x - I)`` per perturbation kind, shape (n, B): they do not depend on
    the explanation, so every method's INFD reuses them (the model calls are the cost)."""
    cache = {}
    if "square" in perturbations:
        masks = square_masks(x.shape[2], x.shape[3], cfg.square_sizes, x.device)
        cache["square"] = square_drops(model, x, masks, y, cfg.max_batch)
    if "noisy_baseline" in perturbations:
        cache["noisy_baseline"] = perturbation_drops(model, x, noisy_perturbations(x, cfg), y, cfg.max_batch)
    return cache


def noisy_perturbations(x: torch.Tensor, cfg: SaliencyConfig) -> torch.Tensor:
    """The noisy-baseline draws of the INFD, the same for every method (seeded)."""
    gen = torch.Generator(device=x.device).manual_seed(cfg.seed + 1)
    return noisy_baseline_perturbations(x, cfg.infd_samples, cfg.nb_sigma, generator=gen)


def sem(v: torch.Tensor) -> float:
    return float(v.std() / len(v) ** 0.5) if len(v) > 1 else 0.0


def evaluate_method(model: nn.Module, name: str, x: torch.Tensor, y: torch.Tensor, cfg: SaliencyConfig,
                    local: bool, cache: dict[str, torch.Tensor] | None = None,
                    sg_global: str | None = None) -> tuple[dict, torch.Tensor]:
    """Per-example SENS_max and INFD of one method; returns (mean metrics, explanation of x).
    ``cache``: ``infidelity_cache`` of the same (model, x, y); ``sg_global`` overrides the config's."""
    t0 = time.perf_counter()
    use_local = local or name == "NB"
    pert = "noisy_baseline" if use_local else "square"
    if cache is None or pert not in cache:
        cache = {**(cache or {}), **infidelity_cache(model, x, y, cfg, (pert,))}
    variant = None if use_local or not name.endswith("-SG") else (sg_global or cfg.sg_global)
    build = explanation_builder(name, model, cfg, x.device)
    expl = build(variant)
    if not use_local:
        expl = to_global(expl)
    drops = cache[pert]
    if name == "Square":  # the same least squares on the cached drops: no model calls
        masks = square_masks(x.shape[2], x.shape[3], cfg.square_sizes, x.device)
        phi = square_attribution(masks, drops, x.shape).to(x.dtype)
    else:
        phi = expl(x, y)
    if use_local:
        infd = infidelity_from_perturbations(model, x, phi, noisy_perturbations(x, cfg), y, drops=drops)
    else:
        masks = square_masks(x.shape[2], x.shape[3], cfg.square_sizes, x.device)
        infd = square_infidelity(model, x, phi, masks, y, drops=drops)
    lim = cfg.method_sens.get(name, {})
    m, k = int(lim.get("examples", len(x))), int(lim.get("samples", cfg.sens_samples))

    def sens_of(explanation, clip: bool) -> dict[str, torch.Tensor]:
        gen_s = torch.Generator(device=x.device).manual_seed(cfg.seed + 2)  # the same deltas for every variant
        return max_sensitivities(explanation, x[:m], cfg.sens_radius, k, y[:m], normalizations=cfg.normalizations,
                                 max_batch=cfg.max_batch, clip=(0.0, 1.0) if clip else None, generator=gen_s)

    sens = sens_of(expl, cfg.clip)
    metrics, per_example = summary(sens[cfg.normalizations[0]], infd, drops, pert, k, cfg.clip, t0)
    values = {f"sens_max_{norm}": v for norm, v in sens.items()}
    if name in LOCAL_METHODS and name != "NB":
        values.update(variant_sensitivities(build, lim.get("variants", cfg.sens_variants), sens_of))
    for key, v in values.items():
        metrics[key], metrics[key + "_sem"] = float(v.mean()), sem(v)
    if cfg.per_example:
        metrics["per_example"] = {key: v.tolist() for key, v in {**per_example, **values}.items()}
    if variant is not None:
        metrics["sg_global"] = variant
    return metrics, phi


def explanation_builder(name: str, model: nn.Module, cfg: SaliencyConfig, device):
    """``build(sg_form)``: the explanation ``name`` with the config's settings, ``sg_form`` its global
    SmoothGrad form (None: the local one)."""
    def build(sg_form):  # a fresh generator each time: every form sees the same SmoothGrad draws
        return make_explanation(name, model, sg_radius=cfg.sg_radius, sg_samples=cfg.sg_samples,
                                ig_steps=cfg.ig_steps, shap_samples=cfg.shap_samples, nb_samples=cfg.nb_samples,
                                nb_sigma=cfg.nb_sigma, square_sizes=cfg.square_sizes, max_batch=cfg.max_batch,
                                generator=torch.Generator(device=device).manual_seed(cfg.seed), sg_global=sg_form)
    return build


def summary(head: torch.Tensor, infd: torch.Tensor, drops: torch.Tensor, pert: str, k: int, clip: bool,
            t0: float) -> tuple[dict, dict[str, torch.Tensor]]:
    """(mean metrics of SENS_max ``head`` and INFD with their standard errors, per-example INFD tensors);
    ``infd_rel`` is INFD over the zero explanation's, ``seconds`` the time since ``t0``."""
    ref = (drops * drops).mean(0)  # INFD of the zero explanation
    rel = infd / ref.clamp_min(1e-30)
    metrics = {"sens_max": float(head.mean()), "sens_max_sem": sem(head), "infd": float(infd.mean()),
               "infd_sem": sem(infd), "perturbation": pert, "infd_rel": float(rel.mean()), "infd_rel_sem": sem(rel),
               "infd_zero": float(ref.mean()), "sens_examples": len(head), "sens_samples": k, "clip": clip,
               "seconds": time.perf_counter() - t0}
    return metrics, {"infd": infd, "infd_rel": rel, "infd_zero": ref}


def variant_sensitivities(build, variants: Sequence[str], sens_of) -> dict[str, torch.Tensor]:
    """``sens_max_<variant>_<normalisation>`` of each of ``SENS_VARIANTS`` asked for (local: Phi itself,
    global: x * Phi; ``_clipped``: y = x + delta clipped to [0, 1]), from the same deltas."""
    values = {}
    for v_name in variants:
        form = build(None) if v_name.startswith("local") else to_global(build(None))
        for norm, v in sens_of(form, v_name.endswith("clipped")).items():
            values[f"sens_max_{v_name}_{norm}"] = v
    return values


def saliency_table(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   cfg: SaliencyConfig) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """``({"global"|"local": {method: metrics}}, {method: maps of x})`` for the examples ``(x, y)``.

    Each method also gets ``infd_rel``: per-example INFD over the zero explanation's INFD
    (``1 - R^2`` of the best scaled explanation), averaged over examples.
    """
    from rich.progress import track

    model.eval()
    cache = infidelity_cache(model, x, y, cfg)  # shared by every method
    tables: dict[str, dict] = {"global": {}}
    maps: dict[str, torch.Tensor] = {}
    for name in track(cfg.methods, description=f"SENS_max / INFD, {len(x)} examples"):
        tables["global"][name], maps[name] = evaluate_method(model, name, x, y, cfg, local=False, cache=cache)
    if cfg.local:
        tables["local"] = {}
        for name in track(cfg.methods, description="local setting"):
            if name in LOCAL_METHODS and name != "NB":
                tables["local"][name], _ = evaluate_method(model, name, x, y, cfg, local=True, cache=cache)
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


def sens_columns(metrics: dict) -> list[str]:
    """The SENS normalisations present in one method's metrics (older JSON has only ``sens_max``)."""
    return [n for n in SENS_NORMALISATIONS if f"sens_max_{n}" in metrics] or [""]


def markdown_table(tables: dict[str, dict], columns: dict[str, dict[str, dict]] | None = None) -> str:
    """Markdown of one model's tables, or of several (``columns = {model_name: tables}``) side by side;
    one SENS_max column per normalisation computed, mean ± standard error over examples."""
    columns = columns or {"": tables}
    lines = []
    for setting in next(iter(columns.values())):
        names = list(columns)
        norms = sens_columns(next(iter(next(iter(columns.values()))[setting].values())))
        sens_head = [f"SENS_max ({n})" if n else "SENS_max" for n in norms]
        head = "| Method | " + " | ".join(" | ".join(f"{n} {h}".strip() for h in [*sens_head, "INFD", "INFD/INFD(0)"])
                                          for n in names) + " |"
        lines += [f"**{setting}** ({'x*Phi, square removal; NB: noisy baseline' if setting == 'global' else 'Phi, noisy baseline'})",
                  "", head, "|---" * (1 + (len(norms) + 2) * len(names)) + "|"]
        for method in next(iter(columns.values()))[setting]:
            cells = []
            for n in names:
                m = columns[n][setting][method]
                for norm in norms:
                    key = f"sens_max_{norm}" if norm else "sens_max"
                    cells.append(f"{m[key]:.3g} ± {m[key + '_sem']:.2g}")
                cells += [f"{m['infd']:.3g} ± {m['infd_sem']:.2g}", f"{m['infd_rel']:.3g}"]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        for pert in dict.fromkeys(m["perturbation"] for m in next(iter(columns.values()))[setting].values()):
            zero = []
            for n in names:
                ref = next(m["infd_zero"] for m in columns[n][setting].values() if m["perturbation"] == pert)
                zero.append("| -" * len(norms) + f" | {ref:.3g} | 1")
            lines.append(f"| zero explanation, {pert} (E[df^2]) " + " ".join(zero) + " |")
        lines.append("")
    return "\n".join(lines)


def save_maps_png(x: torch.Tensor, maps: dict[str, torch.Tensor], path: Path, n_rows: int = 4,
                  labels: torch.Tensor | None = None, preds: torch.Tensor | None = None, title: str | None = None) -> None:
    """Grid: input then each method's map (channel sum, zero mean / unit variance, as the paper),
    one shared colorbar; ``labels`` / ``preds`` are written beside each row's input."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows = min(n_rows, x.shape[0])
    names = list(maps)
    fig, axes = plt.subplots(n_rows, 1 + len(names), figsize=(1.6 * (1 + len(names)) + 0.8, 1.6 * n_rows + 0.4),
                             squeeze=False)
    im = None
    for r in range(n_rows):
        img = x[r].detach().cpu()
        axes[r, 0].imshow(img.permute(1, 2, 0).squeeze(-1), cmap="gray" if img.shape[0] == 1 else None)
        if labels is not None:
            text = f"label {int(labels[r])}" + (f"\npred {int(preds[r])}" if preds is not None else "")
            axes[r, 0].text(-0.1, 0.5, text, transform=axes[r, 0].transAxes, ha="right", va="center", fontsize=7)
        for c, name in enumerate(names, start=1):
            m = maps[name][r].detach().cpu().double().sum(0)
            m = (m - m.mean()) / m.std().clamp_min(1e-12)
            im = axes[r, c].imshow(m, cmap="bwr", vmin=-3, vmax=3)
    for c, name in enumerate(["input", *names]):
        axes[0, c].set_title(name, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0.04, 0, 0.93, 1))
    if im is not None:
        cax = fig.add_axes((0.94, 0.15, 0.015, 0.7))
        fig.colorbar(im, cax=cax).set_label("attribution (z-score per map)", fontsize=7)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(tables: dict[str, dict], cfg: SaliencyConfig, out_dir: Path, name: str = "saliency",
                 extra: dict | None = None) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"config": asdict(cfg), "tables": tables, **(extra or {})}
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=2, default=list))
    (out_dir / f"{name}.md").write_text(markdown_table(tables) + "\n")
