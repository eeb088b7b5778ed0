"""One LightningModule for the four ways of training the Dai et al. VAE.

mode            inner refinement         gradient of the refined ELBO reaches the encoder by
vae             none (K = 0)             the amortized ELBO directly
svi             K steps, no graph        - (encoder trained on its amortized ELBO)
savi_unrolled   K steps, create_graph    backprop through every inner step
savi_ift        solve without a graph    the implicit function theorem at the refined lambda

Why the proximal term (model.inner.eta) matters for savi_ift: at an exact optimum lambda* of the
ELBO alone, lambda* does not depend on where the solver started, so d lambda*/d lambda_0 = 0 and the
encoder receives no gradient; the decoder gradient is just the partial derivative (envelope
theorem). With J(lambda) = ELBO(lambda) - ||lambda - lambda_0||^2 / (2 eta) the optimum moves with
lambda_0 (iMAML's construction), and the Hessian is shifted by I / eta, which also conditions the
IFT's linear solve. With eta = null (no term) the encoder is trained on its amortized ELBO instead.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch

from ift.savi.inner import InnerConfig, InnerResult, proximal_objective, refine
from ift.savi.model import GaussianVAE

MODES = ("vae", "svi", "savi_unrolled", "savi_ift")


class SAVIModule(pl.LightningModule):
    def __init__(
        self,
        input_shape: list[int] | tuple[int, ...],
        mode: str = "vae",
        latent_dim: int = 8,
        hidden: list[int] | tuple[int, ...] = (128, 128),
        gamma: dict[str, Any] | None = None,
        lr: float = 1e-3,
        train_samples: int = 1,
        inner_samples: int = 4,
        inner: dict[str, Any] | None = None,
        ift: dict[str, Any] | None = None,
        amortized_weight: float | None = None,
        active_unit_threshold: float = 0.01,
        eval_seed: int = 1234,
        num_classes: int | None = None,  # accepted for a uniform model interface; unused
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if mode not in MODES:
            raise ValueError(f"model.mode={mode!r} is unknown; use one of {MODES}")
        if not lr > 0:
            raise ValueError(f"model.lr must be > 0, got {lr}")
        if train_samples < 1 or inner_samples < 1:
            raise ValueError(f"model.train_samples and model.inner_samples must be >= 1, got "
                             f"{train_samples}, {inner_samples}")
        gamma = {"init": 1.0, "learn": True, "min": 1e-4, **(gamma or {})}
        inner_kwargs = dict(inner or {})
        if "betas" in inner_kwargs:
            inner_kwargs["betas"] = tuple(inner_kwargs["betas"])
        self.inner_cfg = InnerConfig(**inner_kwargs)
        self.ift_cfg = {"solver": "cg", "tol": 1e-6, "maxiter": 100, "ridge": 0.0, **(ift or {})}
        from ift.implicit import get_linear_solver

        try:  # unknown solver names fail here, not at the first backward
            get_linear_solver(self.ift_cfg["solver"], tol=self.ift_cfg["tol"], maxiter=self.ift_cfg["maxiter"],
                              ridge=self.ift_cfg["ridge"])
        except (ValueError, TypeError) as err:
            raise ValueError(f"model.ift.solver: {err}") from None
        self.mode = mode
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
    def refine(self, x: torch.Tensor, lam0: torch.Tensor, eps: torch.Tensor) -> InnerResult:
        """lambda_K for this module's mode (vae: lambda_0 itself, no steps)."""
        if self.mode == "vae" or self.inner_cfg.steps == 0:
            zeros = torch.zeros(x.shape[0], device=x.device)
            return InnerResult(lam0, zeros.long(), zeros, zeros.bool())
        unrolled = self.mode == "savi_unrolled" and torch.is_grad_enabled()
        params = self.vae.generative_params()
        if not unrolled:
            params = {k: v.detach() for k, v in params.items()}
        objective = proximal_objective(lambda lam: self.vae.elbo(x, lam, eps, params),
                                       lam0 if unrolled else lam0.detach(), self.inner_cfg.eta)
        result = refine(objective, lam0, self.inner_cfg, create_graph=unrolled)
        if self.mode == "savi_ift" and torch.is_grad_enabled():
            result.lam = self._attach_implicit(x, lam0, eps, result)
        return result

    def _attach_implicit(self, x: torch.Tensor, lam0: torch.Tensor, eps: torch.Tensor,
                         result: InnerResult) -> torch.Tensor:
        """Re-attach the solver's lambda_K to (lambda_0, theta) through the IFT."""
        from ift.implicit import implicit_argmin

        generative = self.vae.generative_params()
        names, theta = list(generative), list(generative.values())
        eta = self.inner_cfg.eta

        def negative_objective(lam, lam0_, *theta_):
            params = dict(zip(names, theta_))
            elbo = lambda l: self.vae.elbo(x, l, eps, params)  # noqa: E731
            return -proximal_objective(elbo, lam0_, eta)(lam).sum()

        good = ~result.diverged
        lam_star = implicit_argmin(
            negative_objective, result.lam.detach(), lam0, *theta,
            batch_dims=1, linear_solver=self.ift_cfg["solver"], tol=self.ift_cfg["tol"],
            maxiter=self.ift_cfg["maxiter"], ridge=self.ift_cfg["ridge"], on_solve=self._record_solve,
        )
        # Diverged examples fell back to lambda_0: their gradient is the amortized one.
        return torch.where(good.unsqueeze(-1), lam_star, lam0)

    def _record_solve(self, info) -> None:
        self._solve_info = info

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        """The IFT's linear solve runs in backward, after training_step: log its diagnostics here."""
        info, self._solve_info = getattr(self, "_solve_info", None), None
        if info is not None:
            self.log_dict({"ift/linsolve_iters": info.iterations.float().mean(),
                           "ift/linsolve_residual": info.residual.max(),
                           "ift/linsolve_unconverged": (~info.converged).float().sum()},
                          on_step=True, on_epoch=False, batch_size=len(info.iterations))

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
        recon, kl = self.vae.elbo_terms(x, result.lam, eps)
        elbo = recon - kl
        loss = -elbo.mean()
        # Amortized ELBO with the decoder frozen: it trains only the encoder.
        frozen = {k: v.detach() for k, v in self.vae.generative_params().items()}
        elbo_amortized = self.vae.elbo(x, lam0, eps, frozen)
        if self.amortized_weight:
            loss = loss - self.amortized_weight * elbo_amortized.mean()
        self._log_split("train", elbo, elbo_amortized, kl, result, x.shape[0])
        return loss

    def _evaluate(self, split: str, batch, batch_idx: int) -> None:
        """Val/test: common random numbers (fixed noise per batch index) so epochs are comparable."""
        x = self._flatten(batch)
        gen = torch.Generator(device=x.device).manual_seed(self.hparams.eval_seed + batch_idx)
        lam0 = self.vae.encode(x)
        eps_inner = self.vae.sample_eps(x.shape[0], self.hparams.inner_samples, generator=gen, like=x)
        eps = self.vae.sample_eps(x.shape[0], 1, generator=gen, like=x)
        with torch.no_grad():
            result = self.refine(x, lam0, eps_inner)
            recon, kl = self.vae.elbo_terms(x, result.lam, eps)
            elbo_amortized = self.vae.elbo(x, lam0, eps)
            mu = result.lam.chunk(2, dim=-1)[0]
            recon_mse = (self.vae.decode(mu) - x).pow(2).mean()
        elbo = recon - kl
        batch_size = x.shape[0]
        self._log_split(split, elbo, elbo_amortized, kl, result, batch_size)
        self.log(f"{split}/loss", -elbo.mean(), batch_size=batch_size, sync_dist=True)
        self.log(f"{split}/recon_mse", recon_mse, batch_size=batch_size, sync_dist=True)
        self.log(f"{split}/gamma", self.vae.gamma, batch_size=batch_size, sync_dist=True)
        self._val_mu.append(mu.detach())

    def _log_split(self, split, elbo, elbo_amortized, kl, result: InnerResult, batch_size: int) -> None:
        on_step = split == "train"
        metrics = {
            f"{split}/elbo": elbo.mean(),
            f"{split}/elbo_amortized": elbo_amortized.mean(),
            f"{split}/amortization_gap": (elbo - elbo_amortized).mean(),
            f"{split}/kl": kl.mean(),
        }
        if self.mode != "vae":
            metrics[f"inner/{split}_steps_taken" if split != "train" else "inner/steps_taken"] = (
                result.steps_taken.float().mean())
            metrics["inner/grad_norm_final" if split == "train" else f"inner/{split}_grad_norm_final"] = (
                result.grad_norm.nan_to_num(0.0).mean())
            metrics["inner/diverged" if split == "train" else f"inner/{split}_diverged"] = (
                result.diverged.float().sum())
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
        mu = torch.cat(self._val_mu)
        self._val_mu.clear()
        if self.trainer.world_size > 1:
            mu = self.all_gather(mu).flatten(0, 1)
        active = (mu.var(dim=0) > self.hparams.active_unit_threshold).sum().float()
        self.log(f"{split}/active_units", active, sync_dist=False, rank_zero_only=False)

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
        for batch_idx, (x, _) in enumerate(datamodule.test_dataloader()):
            if max_examples is not None and count >= max_examples:
                break
            x = x.to(self.device).flatten(1)
            if max_examples is not None:
                x = x[: max_examples - count]
            eps = self.vae.sample_eps(x.shape[0], 1, generator=gen, like=x)
            lam = self.refine(x, self.vae.encode(x), eps).lam
            ll = self.vae.iwae_log_likelihood(x, lam, n_samples=n_samples, chunk=chunk, generator=gen)
            total += float(ll.sum())
            count += x.shape[0]
        return {"test/iwae_ll": total / max(count, 1), "test/iwae_samples": float(n_samples),
                "test/iwae_examples": float(count)}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
