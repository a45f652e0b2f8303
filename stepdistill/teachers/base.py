"""What a teacher provides to the rest of the toolkit."""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..models.score import ScoreModel, move_modules


class Teacher(ABC):
    """A frozen score model plus what the toolkit needs around it.

    `score` is the frozen teacher; `student_network()` returns a fresh trainable copy that generator and fake score
    start from; `sample_cond` draws the conditions a batch is made of; `domain` selects the evaluation protocol.
    """

    score: ScoreModel
    shape: tuple[int, ...]  # one sample's shape: (C, H, W) images or (D,) vectors
    num_classes: int | None = None
    domain: str = "none"  # "gmm" | "fashion-mnist" | "none"

    @abstractmethod
    def student_network(self, width: float = 1.0) -> ScoreModel:
        """A trainable ScoreModel initialised from the teacher; with width < 1 a randomly initialised network of the
        same family with its channels (hidden units) scaled by `width` (a smaller MSD student, pretrained by TSM)."""

    def trainable_network(self, g, seed: int = 0) -> ScoreModel:
        """A trainable network for generator or fake score under the recipe's `generator` section `g`: the
        student_network (a full copy, or smaller with width < 1), or with generator.lora_rank a LoRA adapter on the
        teacher's own frozen weights (`seed` draws the adapter's initial A matrices)."""
        if g.lora_rank:
            from ..models.lora import with_lora

            return with_lora(self.score, g.lora_rank, g.lora_alpha, g.lora_targets, seed)
        return self.student_network(g.width)

    def sample_cond(self, n: int, generator: torch.Generator | None = None,
                    classes: list[int] | None = None) -> torch.Tensor | None:
        """(n,) uniform class labels for class-conditional teachers (uniform over `classes` when given: an MSD
        student's subset), else None."""
        if self.num_classes is None:
            return None
        if classes is None:
            return torch.randint(0, self.num_classes, (n,), generator=generator)
        return torch.tensor(classes)[torch.randint(0, len(classes), (n,), generator=generator)]

    def eval_cond(self, n: int, classes: list[int] | None = None) -> torch.Tensor | None:
        """The fixed conditions of n evaluation samples: balanced labels (0, 1, ..., 9, 0, 1, ...) for class-conditional
        teachers, matching a balanced test set (cycling through `classes` instead when given: one MSD student's)."""
        if self.num_classes is None:
            return None
        labels = torch.arange(self.num_classes) if classes is None else torch.tensor(classes)
        return labels[torch.arange(n) % len(labels)]

    def to(self, device: torch.device) -> Teacher:
        """Move the teacher's networks (score, VAE, text encoders) to `device`; conditions and decoded images then
        come from there. Draws of conditions stay on the CPU's random stream."""
        move_modules(self, device)
        return self

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Samples in the teacher's space -> images in [-1, 1] (latent teachers decode with their VAE)."""
        return x

    def feature_network(self) -> ScoreModel:
        """The frozen network whose layers LADD's discriminator reads: the teacher itself."""
        return self.score

    def real_data(self):
        """The teacher's own training data as a source with `sample(n, cond)`, or None when it has none (then a
        recipe that needs real data must give `data.path`)."""
        return None

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3
