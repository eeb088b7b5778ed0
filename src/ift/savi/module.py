"""One LightningModule for the four ways of training the Dai et al. VAE.

mode               inner refinement          gradient of the refined ELBO reaches the encoder by
vae                none (K = 0)              the amortized ELBO directly
svi                K steps, no graph         - (encoder trained on its amortized ELBO)
savi_unrolled      K steps, create_graph     backprop through every inner step
savi_checkpointed  K steps, create_graph     the same, recomputed in ~sqrt(K) checkpointed segments
savi_reversible    K SGD steps, fixed point  the same, by reversing the trajectory exactly (Maclaurin et al.)
savi_ift           solve without a graph     the implicit function theorem at the refined lambda

The IFT gradient is only right at a stationary point. Every refinement reports its relative
stationarity per example; in savi_ift, examples that stopped above `model.inner.tol` follow
`model.inner.nonstationary` (the core's policy): "drop" (default) takes them off the implicit path and
trains them at lambda_0 like a diverged example
(the IFT formula at a non-stationary point is the gradient of nothing in particular, while the
amortized ELBO's gradient is exact, so the fallback costs those examples their refinement but never
gives a wrong direction), "ift" applies the IFT anyway, "error" raises. Either way they are counted
(`inner/nonstationary_frac`) and a warning is issued.

Every refinement's report (iterations, stationarity, divergence, and in savi_ift the fallback count)
is recorded in `solves` as a `SAVIInnerInfo`; `ift.telemetry.SolverDiagnostics` logs it as
`inner/*` (val/test: `inner/val_*`, `inner/test_*`), like the backward's `ift/*`.

Why the proximal term (model.inner.eta) matters for savi_ift: at an exact optimum lambda* of the
ELBO alone, lambda* does not depend on where the solver started, so d lambda*/d lambda_0 = 0 and the
encoder receives no gradient; the decoder gradient is just the partial derivative (envelope
theorem). With J(lambda) = ELBO(lambda) - ||lambda - lambda_0||^2 / (2 eta) the optimum moves with
lambda_0 (iMAML's construction), and the Hessian is shifted by I / eta, which also conditions the
IFT's linear solve. With eta = null (no term) the encoder is trained on its amortized ELBO instead.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch

from ift import hparams
from ift.implicit import InnerSolveInfo, NonStationaryError, SolveRecorder, implicit_argmin, proximal_objective
from ift.implicit.core import IFTConfig as CoreIFTConfig
from ift.implicit.core import at_least_float32
from ift.implicit.linear_solvers import CG, dense_preconditioner
from ift.implicit.minimize import MinimizeResult
from ift.savi.inner import InnerConfig, refine, refine_reversible
from ift.savi.model import GaussianVAE

MODES = ("vae", "svi", "savi_unrolled", "savi_checkpointed", "savi_reversible", "savi_ift")
UNROLLED = ("savi_unrolled", "savi_checkpointed")
__all__ = ["SAVIModule", "IFTConfig", "SAVIInnerInfo", "NonStationaryWarning", "NonStationaryError", "MODES"]


class NonStationaryWarning(RuntimeWarning):
    """Some examples' inner solve stopped above its stationarity tolerance."""


@dataclass(frozen=True)
class IFTConfig(CoreIFTConfig):
    """Settings of savi_ift's implicit backward (`model.ift.*`): the core's linear_solver / tol /
    max_iter / ridge (cg: the Hessian of -J is symmetric). The policy for examples above
    model.inner.tol is `model.inner.nonstationary` (see the module docstring)."""

    group: ClassVar[str] = "model.ift"
    renamed: ClassVar[dict[str, str]] = {**CoreIFTConfig.renamed, "nonstationary": "model.inner.nonstationary"}


class SAVIInnerInfo(InnerSolveInfo):
    """SAVI's names for its inner-solve statistics (``inner/<name>``; val/test ``inner/<stage>_<name>``);
    ``fallback``: the examples trained at lambda_0 (diverged, or dropped by ``nonstationary=drop``)."""

    names: ClassVar[dict[str, str]] = {
        "steps_taken": "mean_iterations",
        "grad_norm_final": "mean_grad_norm",
        "stationarity": "median_stationarity",
        "stationarity_max": "max_stationarity",
        "nonstationary_frac": "nonstationary_frac",
        "diverged": "diverged",
        "fallback": "fallback",
    }
    stage_key: ClassVar[str] = "{kind}/{stage}_{name}"


def _check_reversible(cfg: InnerConfig) -> None:
    """savi_reversible reverses SGD with momentum for a fixed number of steps, nothing else."""
    if cfg.method != "sgd" or cfg.tol != 0 or not 0 < cfg.momentum <= 1 or cfg.checkpoint_segments is not None:
        raise ValueError(
            "model.mode=savi_reversible supports model.inner.method=sgd with 0 < model.inner.momentum <= 1, "
            "model.inner.tol=0 (a fixed number of steps) and no checkpoint_segments; got "
            f"method={cfg.method}, momentum={cfg.momentum}, tol={cfg.tol:g}, "
            f"checkpoint_segments={cfg.checkpoint_segments}")


def _inner_config(mode: str, inner: dict[str, Any] | None) -> InnerConfig:
    """`model.inner` for this mode: savi_checkpointed defaults to ~sqrt(max_iter) segments, savi_reversible
    and savi_ift check what they need."""
    values = dict(inner or {})
    if mode == "savi_checkpointed" and values.get("checkpoint_segments") is None and "steps" not in values:
        values["checkpoint_segments"] = max(1, round(math.sqrt(int(values.get("max_iter", 20)))))
    cfg = InnerConfig.from_dict(values)
    if mode == "savi_reversible":
        _check_reversible(cfg)
    if mode == "savi_ift" and cfg.tol == 0 and cfg.nonstationary != "ift":
        raise ValueError(f"model.inner.tol=0 leaves every example above tolerance, so "
                         f"model.inner.nonstationary={cfg.nonstationary} would reject them all; set "
                         "model.inner.tol > 0 or model.inner.nonstationary=ift")
    return cfg


class SAVIModule(pl.LightningModule):
    def __init__(
        self,
        input_shape: list[int] | tuple[int, ...],
        mode: str = "vae",
        latent_dim: int = 8,
        hidden: list[int] | tuple[int, ...] = (128, 128),
        gamma: dict[str, Any] | None = None,
        lr: float = 2e-3,
        train_samples: int = 1,
        inner_samples: int = 4,
        inner: dict[str, Any] | None = None,
        ift: dict[str, Any] | None = None,
        amortized_weight: float | None = None,
        kl_warmup_steps: int = 0,
        kl_warmup_start: float = 0.1,
        grad_clip: float | None = None,
        active_unit_threshold: float = 0.01,
        eval_seed: int = 1234,
        num_classes: int | None = None,  # accepted for a uniform model interface; unused
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.mode = hparams.one_of("mode", mode, MODES)
        hparams.positive("lr", lr)
        hparams.integer("train_samples", train_samples, 1)
        hparams.integer("inner_samples", inner_samples, 1)
        hparams.integer("kl_warmup_steps", kl_warmup_steps)
        hparams.in_range("kl_warmup_start", kl_warmup_start, 0, 1, closed_high=True)
        hparams.positive("grad_clip", grad_clip, allow_none=True)
        gamma = {"init": 0.02, "learn": True, "min": 1e-4, **(gamma or {})}
        self.inner_cfg = _inner_config(mode, inner)
        self.ift_cfg = IFTConfig.from_dict(ift)
        self.solves = SolveRecorder()  # inner solves and backward linear solves, logged by SolverDiagnostics
        if amortized_weight is None:
            # The encoder needs a training signal of its own when nothing reaches it through the
            # refinement: SVI (no gradient through it) and IFT without a proximal term.
            no_path = mode == "svi" or (mode == "savi_ift" and not self.inner_cfg.proximal)
            amortized_weight = 1.0 if no_path else 0.0
        self.amortized_weight = float(amortized_weight)
        self.vae = GaussianVAE(
            data_dim=math.prod(input_shape),
            latent_dim=latent_dim,
            hidden=hidden,
            gamma_init=float(gamma["init"]),
            learn_gamma=bool(gamma["learn"]),
            gamma_min=float(gamma["min"]),
        )
        self._val_mu: list[torch.Tensor] = []

    # --- inference --------------------------------------------------------------------------
    def refine(self, x: torch.Tensor, lam0: torch.Tensor, eps: torch.Tensor) -> MinimizeResult:
        """lambda_K for this module's mode (vae: lambda_0 itself, no steps); `.x` is lambda_K. Records
        the solve's report (kind "inner") for every mode but vae."""
        result, fallback = self._refine(x, lam0, eps)
        if self.mode != "vae":
            self.solves.record(SAVIInnerInfo.from_result(result, fallback), "inner")
        return result

    def _refine(self, x: torch.Tensor, lam0: torch.Tensor, eps: torch.Tensor
                ) -> tuple[MinimizeResult, torch.Tensor | None]:
        """The refined result, and in savi_ift with gradients the number of examples trained at lambda_0."""
        if self.mode == "vae" or self.inner_cfg.max_iter == 0:
            zeros = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
            return MinimizeResult(lam0, zeros, zeros, zeros, zeros.long(), ~zeros.bool(), zeros.bool(),
                                  self.inner_cfg.tol), None
        # Solvers keep their working precision: under autocast (trainer.precision=bf16-mixed) the
        # inner solve would run in bf16 and stop far above model.inner.tol, so savi_ift would train
        # nearly every example at lambda_0. The solve and the IFT attach run in >= float32; the
        # outer ELBO stays under autocast.
        with torch.autocast(device_type=x.device.type, enabled=False):
            x, lam0, eps = at_least_float32(x), at_least_float32(lam0), at_least_float32(eps)
            unrolled = self.mode in UNROLLED and torch.is_grad_enabled()
            reversible = self.mode == "savi_reversible" and torch.is_grad_enabled()
            params = self.vae.generative_params()
            if reversible:  # the same SGD loop as unrolled; its backward reverses it instead of storing it
                return refine_reversible(self.vae, x, lam0, eps, params, self.inner_cfg), None
            if not unrolled:
                params = {k: v.detach() for k, v in params.items()}
            result = refine(self.vae, x, lam0 if unrolled else lam0.detach(), eps, params, self.inner_cfg,
                            create_graph=unrolled)
            fallback = None
            if self.mode == "savi_ift" and torch.is_grad_enabled():
                result.x, fallback = self._attach_implicit(x, lam0, eps, result)
        return result, fallback

    def _attach_implicit(self, x: torch.Tensor, lam0: torch.Tensor, eps: torch.Tensor,
                         result: MinimizeResult) -> tuple[torch.Tensor, torch.Tensor]:
        """Re-attach the solver's lambda_K to (lambda_0, theta) through the IFT, per the policy; and
        the number of examples left at lambda_0."""
        generative = self.vae.generative_params()
        names, theta = list(generative), list(generative.values())
        eta = self.inner_cfg.eta

        def negative_objective(lam, lam0_, *theta_):
            params = dict(zip(names, theta_))
            neg_elbo = lambda l: -self.vae.elbo(x, l, eps, params)  # noqa: E731
            return proximal_objective(neg_elbo, lam0_, eta)(lam).sum()

        policy = self.inner_cfg.nonstationary
        nonstationary = result.nonstationary
        count = int(nonstationary.sum()) if self.inner_cfg.tol > 0 else 0  # tol 0: a fixed budget, no test
        if count:
            message = (f"inner solve stopped above model.inner.tol={self.inner_cfg.tol:g} on {count}/{len(nonstationary)} "
                       f"examples (max stationarity {float(result.stationarity.max()):.2e}); "
                       f"model.inner.nonstationary={policy}")
            if policy == "error":
                raise NonStationaryError(message + ": raise model.inner.max_iter or choose another policy")
            warnings.warn(message, NonStationaryWarning, stacklevel=3)
        good = ~result.diverged & (~nonstationary if policy == "drop" else True)
        lam_star = implicit_argmin(
            negative_objective, result.x.detach(), lam0, *theta,
            batch_dims=1, **self._backward_solver(result.hessian), on_solve=self.solves.record,
        )
        # Diverged (and, by policy, non-stationary) examples train at lambda_0: the amortized gradient.
        return torch.where(good.unsqueeze(-1), lam_star, lam0), (~good).float().sum()

    def _backward_solver(self, hessian: torch.Tensor | None) -> dict[str, Any]:
        """model.ift's solver settings. With cg and Newton's last Hessian at lambda* (the backward's
        own matrix, the Hessian of -J), that Hessian preconditions CG: ~1 iteration instead of ~14
        (rows where it was not built at lambda* run plain CG; convergence is tested as before)."""
        kwargs = self.ift_cfg.solver_kwargs()
        if kwargs["linear_solver"] != "cg" or hessian is None:
            return kwargs
        shifted = hessian + kwargs["ridge"] * torch.eye(hessian.shape[-1], dtype=hessian.dtype, device=hessian.device)
        return {"linear_solver": CG(tol=kwargs["tol"], max_iter=kwargs["max_iter"], ridge=kwargs["ridge"],
                                    preconditioner=dense_preconditioner(shifted))}

    # --- steps ------------------------------------------------------------------------------
    def _flatten(self, batch) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if tuple(x.shape[1:]) != tuple(self.hparams.input_shape):
            raise ValueError(
                f"data batches have shape {tuple(x.shape[1:])} per example but the model was built for "
                f"model.input_shape={tuple(self.hparams.input_shape)}; use matching data/model configs "
                f"(model configs take input_shape from ${{data.shape}})")
        if not torch.isfinite(x).all():
            raise ValueError("data batch contains NaN/Inf values; check the dataset files")
        return x.flatten(1)

    def training_step(self, batch, batch_idx):
        x = self._flatten(batch)
        lam0 = self.vae.encode(x)
        result = self.refine(x, lam0, self.vae.sample_eps(x.shape[0], self.hparams.inner_samples, like=x))
        # Fresh noise for the outer ELBO: lambda_K was fitted to the inner noise, so the ELBO on
        # that same noise would be optimistically biased.
        eps = self.vae.sample_eps(x.shape[0], self.hparams.train_samples, like=x)
        recon, kl = self.vae.elbo_terms(x, result.x, eps)
        elbo = recon - kl
        beta = self.kl_weight()
        loss = -(recon - beta * kl).mean()
        # Amortized ELBO with the decoder frozen: it trains only the encoder.
        frozen = {k: v.detach() for k, v in self.vae.generative_params().items()}
        elbo_amortized = self.vae.elbo(x, lam0, eps, frozen)
        if self.amortized_weight:
            recon0, kl0 = self.vae.elbo_terms(x, lam0, eps, frozen)
            loss = loss - self.amortized_weight * (recon0 - beta * kl0).mean()
        self._log_split("train", elbo, elbo_amortized, kl, x.shape[0])
        if beta < 1:
            self.log("train/kl_weight", beta, on_step=True, on_epoch=False, batch_size=x.shape[0])
        return loss

    def kl_weight(self) -> float:
        """Kim et al.'s KL warm-up: linear from kl_warmup_start to 1 over kl_warmup_steps (outer loss only)."""
        steps = self.hparams.kl_warmup_steps
        if not steps:
            return 1.0
        start = self.hparams.kl_warmup_start
        return min(1.0, start + (1 - start) * self.global_step / steps)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Outer gradient-norm clipping (Kim et al. clip at 5), when model.grad_clip is set."""
        if self.hparams.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.parameters(), self.hparams.grad_clip)

    def _evaluate(self, split: str, batch, batch_idx: int) -> None:
        """Val/test: common random numbers (fixed noise per batch index) so epochs are comparable."""
        x = self._flatten(batch)
        gen = torch.Generator(device=x.device).manual_seed(self.hparams.eval_seed + batch_idx)
        lam0 = self.vae.encode(x)
        eps_inner = self.vae.sample_eps(x.shape[0], self.hparams.inner_samples, generator=gen, like=x)
        eps = self.vae.sample_eps(x.shape[0], 1, generator=gen, like=x)
        with torch.no_grad():
            result = self.refine(x, lam0, eps_inner)
            recon, kl = self.vae.elbo_terms(x, result.x, eps)
            elbo_amortized = self.vae.elbo(x, lam0, eps)
            mu = result.x.chunk(2, dim=-1)[0]
            recon_mse = (self.vae.decode(mu) - x).pow(2).mean()
        elbo = recon - kl
        batch_size = x.shape[0]
        self._log_split(split, elbo, elbo_amortized, kl, batch_size)
        self.log(f"{split}/loss", -elbo.mean(), batch_size=batch_size, sync_dist=True)
        self.log(f"{split}/recon_mse", recon_mse, batch_size=batch_size, sync_dist=True)
        self.log(f"{split}/gamma", self.vae.gamma, batch_size=batch_size, sync_dist=True)
        self._val_mu.append(mu.detach())

    def _log_split(self, split, elbo, elbo_amortized, kl, batch_size: int) -> None:
        on_step = split == "train"
        metrics = {
            f"{split}/elbo": elbo.mean(),
            f"{split}/elbo_amortized": elbo_amortized.mean(),
            f"{split}/amortization_gap": (elbo - elbo_amortized).mean(),
            f"{split}/kl": kl.mean(),
        }
        # train: per step (names stay `train/elbo`); val/test: epoch means reduced across ranks.
        self.log_dict(metrics, on_step=on_step, on_epoch=not on_step, batch_size=batch_size,
                      sync_dist=not on_step)

    def validation_step(self, batch, batch_idx):
        self._evaluate("val", batch, batch_idx)

    def test_step(self, batch, batch_idx):
        self._evaluate("test", batch, batch_idx)

    def _log_active_units(self, split: str) -> None:
        """Active units (Burda et al.): latent dims whose posterior mean varies across data > threshold."""
        if not self._val_mu:
            return
        mu = torch.cat(self._val_mu).double()
        self._val_mu.clear()
        # Variance across ranks from summed moments: ranks may hold different numbers of examples
        # (all_gather needs equal shapes). Every rank then logs the same value.
        stats = [torch.tensor(float(len(mu)), dtype=mu.dtype, device=mu.device), mu.sum(0), (mu * mu).sum(0)]
        if self.trainer.world_size > 1:
            stats = [self.trainer.strategy.reduce(t, reduce_op="sum") for t in stats]
        n, s1, s2 = stats
        var = (s2 - s1 * s1 / n) / (n - 1).clamp(min=1)
        active = (var > self.hparams.active_unit_threshold).sum().float()
        self.log(f"{split}/active_units", active, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_active_units("val")

    def on_test_epoch_end(self) -> None:
        self._log_active_units("test")

    @torch.no_grad()
    def evaluate_extra(self, datamodule, eval_cfg: dict, out_dir) -> dict[str, float]:
        """eval.py: importance-weighted log p(x) on the test set (IWAE bound, proposal = the
        module's own q: refined for SVI/SAVI modes, amortized for the VAE)."""
        n_samples = int(eval_cfg.get("iwae_samples", 1000))
        chunk = int(eval_cfg.get("iwae_chunk", 100))
        max_examples = eval_cfg.get("iwae_max_examples")
        datamodule.setup("test")
        gen = torch.Generator(device=self.device).manual_seed(self.hparams.eval_seed)
        total, count = 0.0, 0
        from rich.progress import track

        loader = datamodule.test_dataloader()
        for batch_idx, (x, _) in enumerate(track(loader, total=len(loader), description=f"IWAE, {n_samples} samples")):
            if max_examples is not None and count >= max_examples:
                break
            x = x.to(self.device).flatten(1)
            if max_examples is not None:
                x = x[: max_examples - count]
            # the same inner objective as in training (inner_samples fixed draws)
            eps = self.vae.sample_eps(x.shape[0], self.hparams.inner_samples, generator=gen, like=x)
            lam = self.refine(x, self.vae.encode(x), eps).x
            ll = self.vae.iwae_log_likelihood(x, lam, n_samples=n_samples, chunk=chunk, generator=gen)
            total += float(ll.sum())
            count += x.shape[0]
        return {"test/iwae_ll": total / max(count, 1), "test/iwae_samples": float(n_samples),
                "test/iwae_examples": float(count)}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
