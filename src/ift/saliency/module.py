"""LightningModule for the classifiers of the explanation study: natural or PGD adversarial training
(Madry et al.), or one of the other robustifiers of Appendix A.3 (gradient-norm penalty, input
Hessian regulariser, L2 weight penalty); natural and PGD accuracy logged, and the saliency report
as the eval hook."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import lightning as L
import torch
import torch.nn.functional as F

from ift import hparams
from ift.implicit.operators import hvp, power_iteration
from ift.saliency.networks import ARCHITECTURES, build_network, default_arch
from ift.saliency.pgd import pgd_attack
from ift.saliency.theory import require_smooth

OPTIMIZERS = ("adam", "sgd")
ROBUST = ("none", "grad_norm", "hessian", "l2")
HESSIAN_ESTIMATORS = ("hutchinson", "power")


def default_attack(input_shape: Sequence[int]) -> dict[str, float]:
    """Madry et al. on MNIST (eps 0.3, 40 steps of 0.01); CIFAR-10 eps 8/255 with 7 steps of 2/255;
    8x8 digits (coarse, 16 grey levels) eps 0.1 with 10 steps of 0.025."""
    c, h, w = (int(s) for s in input_shape)
    if h < 16:
        return {"eps": 0.1, "step_size": 0.025, "steps": 10}
    if c == 3:
        return {"eps": 8 / 255, "step_size": 2 / 255, "steps": 7}
    return {"eps": 0.3, "step_size": 0.01, "steps": 40}


class ClassifierModule(L.LightningModule):
    """Image classifier; ``pgd=True`` trains on PGD adversarial examples (``classifier_pgd``).

    ``robust`` adds ``robust_weight * R`` to the cross-entropy (Appendix A.3 of Yeh et al.):
    - ``grad_norm``: ``R = mean_b ||grad_x CE(f(x_b), y_b)||_2^2`` (double backprop, Ross & Doshi-Velez);
    - ``hessian``: ``R`` estimates ``mean_b ||Hess_x f_{y_b}(x_b)||^2`` of the true-class logit (the
      explained score) from Hessian-vector products: ``hutchinson`` is ``||H v||^2`` with Rademacher v
      (unbiased for the squared Frobenius norm, ``hessian_probes`` probes), ``power`` is ``||H v||^2``
      with v from ``hessian_iters`` power iterations on ``H^2`` (the squared spectral norm). Needs a
      twice-differentiable network (softplus_mlp): a ReLU net's logit Hessian is zero a.e.;
    - ``l2``: ``R = sum ||W||^2 / 2`` over weight matrices / kernels (biases and norms excluded).
    Attack settings left as ``None`` take the per-dataset defaults of ``default_attack``; the
    validation/test attack uses ``eval_steps`` steps (default: the training steps).
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, arch: str = "auto", width: float = 1.0,
                 hidden: Sequence[int] = (64, 64), depth: int = 20, lr: float = 1e-3, optimizer: str = "adam",
                 weight_decay: float = 0.0, pgd: bool = False, eps: float | None = None,
                 step_size: float | None = None, steps: int | None = None, eval_steps: int | None = None,
                 eval_pgd: bool = True, random_start: bool = True, robust: str = "none", robust_weight: float = 0.0,
                 hessian_estimator: str = "hutchinson", hessian_probes: int = 1, hessian_iters: int = 3):
        super().__init__()
        self.save_hyperparameters()
        input_shape = tuple(int(s) for s in input_shape)
        hparams.one_of("arch", arch, ("auto", *ARCHITECTURES))
        arch = default_arch(input_shape) if arch == "auto" else arch
        hparams.one_of("optimizer", optimizer, OPTIMIZERS)
        hparams.positive("lr", lr)
        hparams.positive("weight_decay", weight_decay, allow_zero=True)
        kwargs = {"madry_cnn": {"width": width}, "small_cnn": {"width": width}, "resnet": {"depth": depth, "width": width},
                  "softplus_mlp": {"hidden": tuple(hidden)}}[arch]
        self.arch = arch
        self.net = build_network(arch, input_shape, num_classes, **kwargs)
        attack = default_attack(input_shape)
        self.attack = {"eps": attack["eps"] if eps is None else hparams.positive("eps", eps, allow_zero=True),
                       "step_size": (attack["step_size"] if step_size is None
                                     else hparams.positive("step_size", step_size, allow_zero=True)),
                       "steps": attack["steps"] if steps is None else hparams.integer("steps", steps)}
        self.eval_steps = self.attack["steps"] if eval_steps is None else hparams.integer("eval_steps", eval_steps)
        self._check_robust(robust, robust_weight, hessian_estimator, hessian_probes, hessian_iters, pgd)

    def _check_robust(self, robust, weight, estimator, probes, iters, pgd) -> None:
        hparams.one_of("robust", robust, ROBUST)
        if robust == "none":
            return
        if pgd:
            raise ValueError(f"model.pgd=true and model.robust={robust}: pick one robustifier (set model.robust=none "
                             "for PGD training)")
        is_number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
        hparams.require(is_number and weight > 0, "robust_weight", f"> 0 with model.robust={robust}", weight)
        if robust == "hessian":
            hparams.one_of("hessian_estimator", estimator, HESSIAN_ESTIMATORS)
            hparams.integer("hessian_probes", probes, low=1)
            hparams.integer("hessian_iters", iters, low=1)
            require_smooth(self.net, f"model.robust=hessian (arch={self.arch})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def adversarial(self, x: torch.Tensor, y: torch.Tensor, steps: int) -> torch.Tensor:
        """PGD examples, attacked in eval mode (BatchNorm statistics untouched), mode restored after.
        Works inside Lightning's inference-mode validation by leaving inference mode locally."""
        was_training = self.net.training
        self.net.eval()
        with torch.inference_mode(False), torch.enable_grad():
            x_adv = pgd_attack(self.net, x.clone(), y.clone(), self.attack["eps"], self.attack["step_size"], steps,
                               random_start=self.hparams.random_start)
        self.net.train(was_training)
        return x_adv

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.hparams.pgd:
            x = self.adversarial(x, y, self.attack["steps"])
        if self.hparams.robust == "none":
            logits = self(x)
            loss = F.cross_entropy(logits, y)
        else:
            logits, penalty = self.penalised_forward(x, y)
            ce = F.cross_entropy(logits, y)
            loss = ce + self.hparams.robust_weight * penalty
            self.log("train/ce", ce)
            self.log("train/penalty", penalty)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", (logits.argmax(1) == y).float().mean())
        return loss

    def penalised_forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, R)`` for ``self.hparams.robust``; R keeps its graph to the weights."""
        robust = self.hparams.robust
        if robust == "l2":
            penalty = sum((p * p).sum() for p in self.net.parameters() if p.dim() > 1) / 2
            return self(x), penalty
        if robust == "grad_norm":
            x = x.detach().requires_grad_(True)
            logits = self(x)
            # summed loss: row b of the input gradient is example b's own gradient
            (g,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), x, create_graph=True)
            return logits, g.flatten(1).pow(2).sum(1).mean()
        return self(x), self.hessian_penalty(x, y)

    def hessian_penalty(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``mean_b ||H_b v_b||^2`` of the true-class logit's input Hessian H_b (see the class doc)."""
        score = lambda z: self(z).gather(1, y.view(-1, 1)).sum()
        x = x.detach()
        if self.hparams.hessian_estimator == "power":
            v0 = torch.randn_like(x)
            h = lambda v: hvp(score, x, v.detach()).detach()
            _, v = power_iteration(lambda v: h(h(v)), v0, iters=self.hparams.hessian_iters, tol=0.0)
            probes = [v]
        else:
            probes = [torch.randint(0, 2, x.shape, device=x.device).to(x.dtype) * 2 - 1
                      for _ in range(self.hparams.hessian_probes)]
        total = sum(hvp(score, x, v, create_graph=True).flatten(1).pow(2).sum(1).mean() for v in probes)
        return total / len(probes)

    def _eval_step(self, batch, stage: str):
        x, y = batch
        logits = self(x)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), prog_bar=stage == "val", sync_dist=True)
        self.log(f"{stage}/acc", (logits.argmax(1) == y).float().mean(), sync_dist=True)
        if self.hparams.eval_pgd:
            x_adv = self.adversarial(x, y, self.eval_steps)
            with torch.inference_mode(False):
                adv_logits = self(x_adv)
            self.log(f"{stage}/pgd_acc", (adv_logits.argmax(1) == y).float().mean(), sync_dist=True)
            self.log(f"{stage}/pgd_loss", F.cross_entropy(adv_logits, y), sync_dist=True)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def configure_optimizers(self):
        if self.hparams.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9,
                                   weight_decay=self.hparams.weight_decay)
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    # ------------------------------------------------------------------ eval.py hook
    def evaluate_extra(self, datamodule, eval_cfg: dict, out_dir: Path) -> dict[str, float]:
        """With ``eval.saliency.enabled`` true: the SENS_max / INFD table on ``eval.saliency.examples``
        test examples, written to ``out_dir/saliency.{json,md,png}``. The other keys of the
        ``eval.saliency`` node are fields of ``SaliencyConfig`` (e.g. ``sens_samples: 50``)."""
        from ift.saliency.report import SaliencyConfig, flatten_metrics, saliency_table, save_maps_png, write_report

        node = dict((eval_cfg or {}).get("saliency") or {})
        if not node.get("enabled"):
            return {}
        cfg = SaliencyConfig.from_dict(node)
        n = int(node.get("examples", 10))
        x, y = first_examples(datamodule, n)
        x, y = x.to(self.device), y.to(self.device)
        tables, maps = saliency_table(self.net, x, y, cfg)
        out_dir = Path(out_dir)
        write_report(tables, cfg, out_dir, extra={"n_examples": len(x), "arch": self.arch, "pgd": self.hparams.pgd})
        save_maps_png(x, maps, out_dir / "saliency.png")
        self._log_wandb_table(tables)
        return flatten_metrics(tables)

    def _log_wandb_table(self, tables: dict) -> None:
        try:
            from lightning.pytorch.loggers import WandbLogger
        except ImportError:  # pragma: no cover
            return
        for logger in getattr(self, "loggers", []) or []:
            if isinstance(logger, WandbLogger):
                rows = [[setting, m, v["sens_max"], v["infd"]] for setting, t in tables.items() for m, v in t.items()]
                logger.log_table(key="saliency/table", columns=["setting", "method", "sens_max", "infd"], data=rows)


def first_examples(datamodule, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` test examples (fixed, so regular and robust models see the same inputs)."""
    if n < 1:
        raise ValueError(f"eval.saliency.examples must be >= 1, got {n}")
    datamodule.setup("test")
    xs, ys, have = [], [], 0
    for x, y in datamodule.test_dataloader():
        xs.append(x)
        ys.append(y)
        have += len(x)
        if have >= n:
            break
    return torch.cat(xs)[:n], torch.cat(ys)[:n]
