"""Discriminators on diffusion transformers (SD3, FLUX, SANA): the taps read the image tokens after whole blocks (not
the text tokens SD3's and FLUX's joint blocks also return), heads turn them into one logit per sample, and every
adversarial objective trains on a transformer teacher: LADD on SANA is SANA-Sprint's own setting."""
import json

import pytest
import torch

from stepdistill.models.backbones import backbone_of
from stepdistill.models.discriminator import (
    DiscriminatorHead,
    TeacherFeatureDiscriminator,
    captured,
    discriminate,
    feature_module,
)
from stepdistill.recipe import load_recipe
from stepdistill.training.trainer import Trainer, build

IMAGE_TOKENS = {"tiny-sd3": 16, "tiny-flux": 16, "tiny-sana": 64}  # 8x8 latents in 2x2 patches (SANA: 1x1)
TEXT_TOKENS = 12


def _built(size, *overrides):
    return build(load_recipe(None, ["train.batch_size=2", *overrides],
                             data={"teacher": {"name": "synthetic", "size": size}, "objective": {}}))


@pytest.mark.parametrize("size", list(IMAGE_TOKENS))
def test_ladd_reads_the_image_tokens_of_four_spaced_teacher_blocks(size):
    b = _built(size, "objective.name=ladd")
    teacher, disc = b.nets.teacher, b.nets.discriminator
    assert isinstance(disc, TeacherFeatureDiscriminator)
    blocks = backbone_of(teacher.net).blocks(teacher.net)
    assert [tap.module for tap in disc._taps] == blocks  # two blocks each at test size: both
    torch.manual_seed(0)
    batch, x = b.batch(3), torch.randn(3, 4, 8, 8, requires_grad=True)
    t = torch.full((3,), 0.5)
    with captured(*disc._taps) as feats:
        teacher(x, t, batch.cond)
    width = teacher.net.config.num_attention_heads * teacher.net.config.attention_head_dim
    assert [f[-1].shape for f in feats] == [(3, IMAGE_TOKENS[size], width)] * len(blocks)
    logits = disc(x, t, batch.cond)
    assert logits.shape == (3, len(blocks)) and logits.isfinite().all()
    logits.sum().backward()  # the generator's gradient reaches its sample through the frozen teacher
    assert x.grad.abs().sum() > 0 and all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.heads.parameters())


def test_the_real_size_taps_are_spread_over_the_stack():
    """Evenly spaced, the last block included: SD3-medium's 24 joint blocks, FLUX-dev's 19 double and 38 single ones
    as one stack of 57, SANA-1.6B's 20; the bottleneck is the middle block."""
    from stepdistill.plan import build_meta

    expected = {"sd3-medium": ([5, 11, 17, 23], 11), "flux-dev": ([13, 27, 42, 56], 28),
                "sana-1600m": ([4, 9, 14, 19], 9)}
    for size, (levels, middle) in expected.items():
        recipe = load_recipe(None, ["train.batch_size=2", "objective.gan_weight=0.01"],
                             data={"teacher": {"name": "synthetic", "size": size}, "objective": {"name": "vsd"}})
        built, _ = build_meta(recipe)
        net = built.nets.teacher.net
        blocks = backbone_of(net).blocks(net)
        assert [blocks.index(tap.module) for tap in backbone_of(net).levels(net)] == levels
        fake = built.nets.fake_score.net
        assert backbone_of(fake).blocks(fake).index(feature_module(built.nets.fake_score).module) == middle


@pytest.mark.parametrize("size", list(IMAGE_TOKENS))
def test_fake_score_heads_and_sidas_encoder_mean_on_a_transformer(size):
    b = _built(size, "objective.name=vsd", "objective.gan_weight=0.01")
    fake, head = b.nets.fake_score, b.nets.discriminator
    assert isinstance(head, DiscriminatorHead) and head.kind == "tokens"
    torch.manual_seed(0)
    batch = b.batch(3)
    x_t, t = torch.randn(3, 4, 8, 8), torch.full((3,), 0.5)
    pred, logits = discriminate(fake, head, x_t, t, batch.cond)
    assert logits.shape == (3,) and logits.isfinite().all() and pred.x0.shape == x_t.shape
    _, means = discriminate(fake, None, x_t, t, batch.cond)  # SiDA: one logit per image token
    assert means.shape == (3, IMAGE_TOKENS[size])
    with captured(feature_module(fake)) as (feats,):
        fake(x_t, t, batch.cond)
    torch.testing.assert_close(means, feats[-1].float().mean(dim=-1))


@pytest.mark.parametrize("objective,extra", [("ladd", []), ("fdiv", []), ("asd", ["generator.steps=2"]),
                                             ("sid", ["objective.adversarial=true", "objective.generator_warmup=0",
                                                      "objective.discriminator=encoder_mean"])])
def test_adversarial_objectives_train_on_a_sana_teacher(objective, extra, tmp_path):
    """A few iterations each, finite all the way; the trained discriminator (heads, or SiDA's fake score) moves."""
    recipe = load_recipe(None, ["train.batch_size=2", "train.iterations=3", "train.log_every=1", "eval.at_end=false",
                                "train.checkpoint_every=3", *extra],
                         data={"teacher": {"name": "synthetic", "size": "tiny-sana"}, "objective": {"name": objective}})
    trainer = Trainer(recipe, tmp_path / "r", quiet=True)
    name = "discriminator" if trainer.built.nets.discriminator is not None else "fake_score"
    before = [p.detach().clone() for p in trainer.built.nets.get(name).parameters()]
    trainer.run()
    stats = [json.loads(line) for line in (tmp_path / "r" / "stats.jsonl").read_text().splitlines()]
    assert stats[-1]["nonfinite"] == 0 and stats[-1]["step"] == 3
    after = list(trainer.built.nets.get(name).parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
