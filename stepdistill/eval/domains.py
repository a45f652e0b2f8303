"""Domain metrics: how a teacher whose data distribution is known is scored (`eval.metrics: domain`).

A teacher names its domain (`Teacher.domain`); the metric of that name, registered here with
`@register("domain", name)`, gives the protocol entries, the reference a split gives, the score, the fewest samples it
takes and an optional baseline. A plug-in teacher with a data set of its own registers its metric in the same file.

- `gmm`: energy distance to exact mixture samples, then mode coverage (eval/metrics.py).
- `fashion-mnist`: Frechet distance in the bundled classifier's feature space against the 10k test set (or the
  validation split, training images 50,000-59,999).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..hashing import file_sha256
from ..models.loading import bundled_path
from ..registry import register
from .features import FashionClassifier
from .metrics import energy_distance, frechet_distance, gaussian_stats, mixture_coverage, mixture_moments

CLASSIFIER_DIR = "checkpoints/fashion-classifier"
# eval.split: the gmm reference draws exact samples with seed + 1 (test) or seed + 3 (val; seed + 2 is the baseline's)
REFERENCE_SEED = {"test": 1, "val": 3}


class DomainMetric:
    """Scores samples of `teacher` (in its own space) against its data."""

    min_samples = 1  # fewest samples one score takes (eval.n, eval.curve_n are checked against it before training)
    what = "domain metric"  # how the check names the metric
    baseline_model = ""  # what `baseline` samples, in words
    columns: tuple[str, ...] = ()  # score entries a benchmark report shows beside the main metric

    def __init__(self, teacher) -> None:
        self.teacher = teacher

    def protocol(self, e) -> dict:
        """Entries of the evaluation protocol: what the reference and the metric are."""
        return {}

    def reference(self, n: int, seed: int, cond: torch.Tensor | None = None, split: str = "test"):
        """What `score` compares against (by default the split's name: the reference is a data set's statistics)."""
        return split

    def score(self, samples: torch.Tensor, reference) -> dict:
        raise NotImplementedError

    def baseline(self, n: int, seed: int) -> torch.Tensor | None:
        """n samples of a reference model scored beside the students, or None."""
        return None


def mixture_of(teacher) -> tuple[torch.Tensor, float, torch.Tensor]:
    """(means (K, D), std, weights (K,)) of a gmm teacher's mixture, on the CPU."""
    d = teacher.denoiser
    return d.means.cpu(), float(d.std), d.log_w.exp().cpu()


def gmm_baseline(teacher, n: int, seed: int) -> torch.Tensor:
    """n samples (seed + 2) of the single Gaussian with the mixture's exact mean and covariance: what knowing the
    data's first two moments alone scores, next to the students."""
    m, c = mixture_moments(*mixture_of(teacher))
    z = torch.randn(n, len(m), generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64)
    return (torch.from_numpy(m) + z @ torch.from_numpy(np.linalg.cholesky(c)).T).float()


@register("domain", "gmm")
class MixtureMetric(DomainMetric):
    """Energy distance to exact mixture samples (the main metric), then mode coverage: the share of samples near a
    component and the worst component's relative mass error."""

    baseline_model = "one Gaussian with the mixture's exact mean and covariance"
    columns = ("near_share", "worst_mass_error")

    def protocol(self, e) -> dict:
        return {"reference": f"{e.n} exact mixture samples (seed {e.seed + REFERENCE_SEED[e.split]})",
                "metric": "energy distance (V-statistic)"}

    def reference(self, n, seed, cond=None, split="test"):
        return self.teacher.sample(n, torch.Generator().manual_seed(seed + REFERENCE_SEED[split]), cond)

    def score(self, samples, reference) -> dict:
        means, std, weights = mixture_of(self.teacher)
        return {"energy_distance": energy_distance(samples, reference),
                **mixture_coverage(samples.cpu(), means, std, weights)}

    def baseline(self, n, seed):
        return gmm_baseline(self.teacher, n, seed)


@lru_cache(maxsize=4)
def _fashion_reference(folder: str, split: str = "test") -> tuple:
    """(classifier, mu, sigma) of a split's features: the bundled statistics for the test set; the validation split's
    are computed here (10k images, a few seconds)."""
    from .features import extract, load_classifier

    path = Path(folder)
    model = load_classifier(path)
    if split == "test":
        stats = np.load(path / "fashion16_test_stats.npz")
        return model, stats["mu"], stats["sigma"]
    from ..data import fashion

    return (model, *gaussian_stats(extract(model, fashion.load(split)[0])))


def fashion_fd(images: torch.Tensor, classifier_dir: str = CLASSIFIER_DIR, split: str = "test") -> float:
    """FD between (N, 1, 16, 16) images in [-1, 1] and a Fashion-MNIST split (test, or val: the held-out last 10k
    training images), in classifier feature space."""
    from .features import extract

    model, mu_ref, sigma_ref = _fashion_reference(str(bundled_path(classifier_dir)), split)
    mu, sigma = gaussian_stats(extract(model, images))
    return frechet_distance(mu, sigma, mu_ref, sigma_ref)


@register("domain", "fashion-mnist")
class FashionMetric(DomainMetric):
    """FD of the (decoded) samples in the bundled classifier's 128-d feature space: its covariance needs more samples
    than features."""

    min_samples = FashionClassifier.num_features + 1
    what = f"the Fashion FD (a covariance of {FashionClassifier.num_features} classifier features)"

    def protocol(self, e) -> dict:
        t = self.teacher
        return {"reference": "fashion-mnist test set (10,000 images), 16x16" if e.split == "test" else
                "fashion-mnist validation split (training images 50,000-59,999), 16x16",
                "metric": "Frechet distance, fashion-classifier 128-d penultimate features",
                "features_sha256": file_sha256(bundled_path(CLASSIFIER_DIR) / "model.safetensors")[:16],
                "teacher_sha256": file_sha256(getattr(t, "single_file", None)  # a single-file teacher: its file
                                              or t.folder / "unet" / "diffusion_pytorch_model.safetensors")[:16],
                "labels": "balanced: i % 10"}

    def score(self, samples, reference) -> dict:
        return {"fd": fashion_fd(self.teacher.decode(samples), split=reference)}
