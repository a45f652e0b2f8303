"""Analytic Gaussian-mixture teacher with the exact denoiser of the noised mixture, in any dimension.

x0 ~ sum_k w_k N(mu_k, s^2 I). Under x_t = alpha x0 + sigma eps,
x_t ~ sum_k w_k N(alpha mu_k, (alpha^2 s^2 + sigma^2) I)
and E[x0 | x_t] = sum_k gamma_k(x_t) (mu_k + alpha s^2 / (alpha^2 s^2 + sigma^2) (x_t - alpha mu_k)),
with gamma_k the posterior responsibilities. The denoiser is exact, so any error in a distilled student is the
method's, not the teacher's. Students (generator and fake score) are that exact denoiser plus a zero-initialised
MLP correction, so they start as exact copies of the teacher. (Starting them from an MLP regressed onto the teacher
instead leaves a fitting error between fake score and teacher that biases VSD: one-step students then land with
their modes about 0.2 too far out.)

With `conditional: true` the mixture is class-conditional: label c is component c (num_classes = number of means),
whose exact denoiser is that single Gaussian's posterior mean mu_c + alpha s^2 / (alpha^2 s^2 + sigma^2)
(x_t - alpha mu_c); the null label (= number of means) gives the whole mixture's. Labels are drawn uniformly, as
for the class-balanced Fashion-MNIST teacher, so the components must have equal weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..data.real import FunctionData
from ..devices import to_device
from ..diffusion.parametrization import Prediction, from_prediction, to_prediction
from ..diffusion.schedules import SCHEDULES, bcast
from ..errors import RecipeError
from ..models.mlp import MLPDenoiser
from ..models.score import ScoreModel
from ..registry import register
from .base import Teacher


@dataclass
class GMMConfig:
    name: str = "gmm"
    means: list[list[float]] = field(default_factory=lambda: [[-2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    weights: list[float] | None = None  # mixture weights (normalised); default uniform
    std: float = 0.2  # isotropic standard deviation of every component
    schedule: str = "flow"  # vp | edm | flow | trigflow: the noising process the teacher's score is exact for
    hidden: int = 256  # width of the students' MLP correction
    init_seed: int = 0  # seed of the students' MLP initialisation
    time_freq: float = 200.0  # highest frequency of the students' time features over t in [0, 1]; consistency
    #                           training (scm) differentiates through them and needs smooth ones (10)
    conditional: bool = False  # class-conditional: label c = component c, label len(means) = the whole mixture


class GMMDenoiser(nn.Module):
    """Exact E[x0 | x_t] of the noised mixture, as a module so it slots in where a network would."""

    def __init__(self, means: torch.Tensor, weights: torch.Tensor, std: float, schedule) -> None:
        super().__init__()
        self.register_buffer("means", means)
        self.register_buffer("log_w", weights.log())
        # what sample() draws from, kept on the CPU whatever device the buffers move to: no copy back per draw
        self._host = (means.clone(), self.log_w.exp())
        self.std, self.schedule = std, schedule

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> Prediction:
        """cond: None or (N,) labels; label c < K selects component c alone, label K (null) the mixture."""
        alpha, sigma = self.schedule.alpha_sigma(t)
        a, s = bcast(alpha, x_t).double(), bcast(sigma, x_t).double()
        x, mu, s2 = x_t.double(), self.means.double(), self.std ** 2
        var = a * a * s2 + s * s  # (N, 1) variance of each noised component
        d2 = ((x.unsqueeze(1) - a.unsqueeze(1) * mu) ** 2).sum(-1)  # (N, K) squared distance to each noised mean
        logits = self.log_w.double() - 0.5 * d2 / var - 0.5 * x.shape[1] * var.log()
        gamma = logits.softmax(dim=1)  # (N, K)
        if cond is not None:  # a labelled sample comes from its component: responsibility 1 there
            k = len(mu)
            one_hot = F.one_hot(cond.long().clamp(max=k - 1), k).to(gamma)
            gamma = torch.where((cond < k).reshape(-1, 1).to(gamma.device), one_hot, gamma)
        post = mu + (a * s2 / var).unsqueeze(1) * (x.unsqueeze(1) - a.unsqueeze(1) * mu)  # (N, K, D)
        x0 = (gamma.unsqueeze(-1) * post).sum(1)
        eps = (x - a * x0) / s.clamp_min(1e-12)
        return Prediction(x0.float(), eps.float())

    def sample(self, n: int, generator: torch.Generator | None = None,
               cond: torch.Tensor | None = None) -> torch.Tensor:
        """(n, D) exact samples, on the CPU (the draws use CPU generators); with (n,) labels cond, sample i from
        component cond[i] (the null label: any)."""
        means, w = self._host
        k = torch.multinomial(w, n, replacement=True, generator=generator)
        if cond is not None:  # labels drawn on the host (Teacher.sample_cond)
            k = torch.where(cond < len(means), cond.long().to(k.device), k)
        return means[k] + self.std * torch.randn(n, means.shape[1], generator=generator)


class _Residual(ScoreModel):
    """The exact denoiser's output (in the prediction kind's units) plus a trainable MLP's."""

    def __init__(self, net: MLPDenoiser, schedule, prediction: str, exact: GMMDenoiser,
                 null_label: int | None = None) -> None:
        super().__init__(net, schedule, prediction, "none" if null_label is None else "class", null_label)
        self._exact = [exact]  # a plain list: the exact denoiser's buffers are the teacher's, not trained weights

    def forward(self, x_t, t, cond=None):  # noqa: D102
        alpha, sigma = self.schedule.alpha_sigma(t)
        base = from_prediction(self.prediction, self._exact[0](x_t, t, cond), alpha, sigma)
        t = to_device(t.float(), x_t.device)  # canonical t in [0, 1]: smooth time features
        out = base + (self.net(x_t, t) if self.conditioning == "none" else self.net(x_t, t, cond))
        return to_prediction(self.prediction, out, x_t, alpha, sigma)


class _Exact(ScoreModel):
    """ScoreModel face of the exact denoiser (no network, no native timestep)."""

    def forward(self, x_t, t, cond=None):  # noqa: D102
        return self.net(x_t, t, cond)


@register("teacher", "gmm")
class GMMTeacher(Teacher):
    Config = GMMConfig
    domain = "gmm"

    def __init__(self, cfg: GMMConfig) -> None:
        means = torch.tensor(cfg.means, dtype=torch.float32)
        if means.ndim != 2 or len(means) == 0:
            raise RecipeError(f"teacher.means must be a non-empty list of equal-length vectors, got {cfg.means}")
        w = torch.ones(len(means)) if cfg.weights is None else torch.tensor(cfg.weights, dtype=torch.float32)
        if w.shape != (len(means),) or (w <= 0).any():
            raise RecipeError(f"teacher.weights must be {len(means)} positive numbers (one per mean), got "
                              f"{cfg.weights}")
        if cfg.std <= 0:
            raise RecipeError(f"teacher.std must be positive, got {cfg.std}")
        if cfg.schedule not in SCHEDULES or cfg.schedule == "vp":
            raise RecipeError(f"teacher.schedule {cfg.schedule!r} not available for gmm; choose edm, flow or trigflow")
        if cfg.conditional and not torch.allclose(w, w.mean().expand_as(w)):
            raise RecipeError(f"teacher.conditional=true draws labels uniformly, so teacher.weights must be equal (got "
                              f"{cfg.weights}); drop teacher.weights or set teacher.conditional=false")
        self.cfg = cfg
        schedule = SCHEDULES[cfg.schedule]()
        self.denoiser = GMMDenoiser(means, w / w.sum(), cfg.std, schedule)
        self.num_classes = len(means) if cfg.conditional else None
        conditioning = "class" if cfg.conditional else "none"
        self.score = _Exact(self.denoiser, schedule, "x0", conditioning, null_label=self.num_classes)
        self.score.requires_grad_(False)
        self.shape = (means.shape[1],)
        self.student_kind = "flow" if cfg.schedule == "flow" else "v"

    def real_data(self) -> FunctionData:
        return FunctionData(self.denoiser.sample)  # exact samples (of the labels' components, when conditional)

    def sample(self, n: int, generator: torch.Generator | None = None,
               cond: torch.Tensor | None = None) -> torch.Tensor:
        """(n, D) exact samples of the mixture (with (n,) labels cond: sample i from component cond[i])."""
        return self.denoiser.sample(n, generator, cond)

    def feature_network(self) -> ScoreModel:
        """The analytic teacher has no layers; LADD reads the hidden layers of a frozen student copy instead (the exact
        denoiser plus the zero-initialised MLP: its output is the teacher's, its features random ones of (x_t, t))."""
        return self.student_network().requires_grad_(False)

    def student_network(self, width: float = 1.0) -> ScoreModel:
        """A trainable copy of the teacher: the exact denoiser plus an MLP correction whose last layer starts at
        zero, so generator and fake score start as exact copies of the teacher, just as image students start
        from a copy of its UNet. The MLP predicts flow velocity (rectified flow) or v (other schedules): both stay
        finite at every t, including pure noise, where eps- or x0-prediction would divide by zero. It sees the
        label through an embedding when the teacher is conditional (harmless at start: its output layer is zero).

        width < 1: the MLP has round(hidden * width) units and keeps its random output layer, so the student starts
        away from the teacher and teacher score matching (generator.tsm_iterations) has something to fit."""
        hidden = self.cfg.hidden if width == 1.0 else max(1, round(self.cfg.hidden * width))
        with torch.random.fork_rng(devices=[]):  # building a student must not shift the training run's random stream
            torch.manual_seed(self.cfg.init_seed)
            mlp = MLPDenoiser(self.shape[0], hidden, max_freq=self.cfg.time_freq, num_classes=self.num_classes)
        if width == 1.0:
            nn.init.zeros_(mlp.net[-1].weight)
            nn.init.zeros_(mlp.net[-1].bias)
        return _Residual(mlp, self.score.schedule, self.student_kind, exact=self.denoiser, null_label=self.num_classes)
