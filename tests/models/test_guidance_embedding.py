"""Guidance-embedded students (SANA-Sprint's CFG embedding, diffusers' LCM time_cond_proj_dim) and per-sample CFG."""
from types import SimpleNamespace

import pytest
import torch

from stepdistill.diffusion.guidance import guidance_scale_embedding
from stepdistill.models.score import embed_guidance, guidance_inputs, warm_start_guidance
from stepdistill.recipe import load_recipe
from stepdistill.teachers import build_teacher


@pytest.fixture(scope="module")
def teacher():
    recipe = load_recipe(None, data={"teacher": {"name": "fashion-t2i"}, "objective": {"name": "vsd"}})
    return build_teacher(recipe.teacher)


def inputs(teacher, n=4):
    torch.manual_seed(0)
    return torch.randn(n, *teacher.shape), torch.rand(n) * 0.9 + 0.05, teacher.eval_cond(n)


def test_embedding_is_diffusers_lcm_embedding():
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([0.0, 3.0, 3.5, 4.0, 7.5])
    for dim in (256, 7):
        expected = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        assert torch.equal(guidance_scale_embedding(w, dim), expected)


def test_zero_initialised_embedding_student_equals_teacher_then_depends_on_each_samples_scale(teacher):
    student = embed_guidance(teacher.student_network(), 4.5)
    net = student.net
    assert net.config.time_cond_proj_dim == 256 and student.guidance_input == 4.5
    assert teacher.score.net.config.time_cond_proj_dim is None  # the teacher is left as it was
    x, t, cond = inputs(teacher)
    with torch.no_grad():
        assert torch.equal(student(x, t, cond).x0, teacher.score(x, t, cond).x0)
        torch.manual_seed(1)
        net.time_embedding.cond_proj.weight.normal_(0, 0.05)  # as after training
        w = torch.tensor([4.0, 4.5, 5.0, 4.5])
        with guidance_inputs(student, w):
            per_sample = student(x, t, cond).x0
        assert student.guidance_input == 4.5  # restored after the block
        assert not torch.allclose(per_sample, teacher.score(x, t, cond).x0, atol=1e-4)
        for i, scale in enumerate(w.tolist()):  # row i is the student at that row's scale, alone
            with guidance_inputs(student, torch.tensor([scale])):
                row = student(x[i:i + 1], t[i:i + 1], cond[i:i + 1]).x0
            assert torch.allclose(per_sample[i:i + 1], row, atol=1e-5)
        same = x[:1].expand(2, -1, -1, -1), t[:1].expand(2), cond[:1].expand(2, -1, -1)
        with guidance_inputs(student, torch.tensor([4.0, 5.0])):
            two = student(*same).x0
        assert not torch.allclose(two[0], two[1], atol=1e-4)  # same input, different scales: different outputs


def test_per_sample_guided_prediction_equals_per_row_float_calls(teacher):
    x, t, cond = inputs(teacher)
    w = torch.tensor([4.0, 4.5, 5.0, 1.0])
    with torch.no_grad():
        guided = teacher.score.guided(x, t, cond, w)
        for i, scale in enumerate(w.tolist()):
            row = teacher.score.guided(x[i:i + 1], t[i:i + 1], cond[i:i + 1], scale)
            assert torch.allclose(guided.x0[i:i + 1], row.x0, atol=1e-5)
            assert torch.allclose(guided.eps[i:i + 1], row.eps, atol=1e-5)


def test_sana_student_gets_sana_sprints_guidance_embedding_and_equals_its_teacher(tmp_path):
    from conftest import make_tiny_sana_folder

    folder = make_tiny_sana_folder(tmp_path / "sana")
    (tmp_path / "prompts.txt").write_text("a red shirt\na blue bag\n")
    recipe = load_recipe(None, data={"teacher": {"name": "sd", "path": str(folder),
                                                 "prompts": str(tmp_path / "prompts.txt")},
                                     "objective": {"name": "vsd"}})
    sana = build_teacher(recipe.teacher)
    student = embed_guidance(sana.student_network(), 4.5)
    assert student.net.config.guidance_embeds and not sana.score.net.config.guidance_embeds
    x, t, cond = inputs(sana, 2)
    with torch.no_grad():
        assert torch.allclose(student(x, t, cond).x0, sana.score(x, t, cond).x0, atol=1e-6)
        student.net.time_embed.guidance_embedder.linear_2.weight.normal_(0, 0.05)
        with guidance_inputs(student, torch.tensor([4.0, 5.0])):
            a = student(x[:1].expand(2, -1, -1, -1), t[:1].expand(2), cond[:1].expand(2, -1, -1)).x0
        assert not torch.allclose(a[0], a[1], atol=1e-5)
    # what SanaSprintPipeline would load: the same class from the saved config and weights
    student.net.save_pretrained(tmp_path / "student")
    from diffusers import SanaTransformer2DModel

    reloaded = SanaTransformer2DModel.from_pretrained(tmp_path / "student")
    assert reloaded.config.guidance_embeds and set(reloaded.state_dict()) == set(student.net.state_dict())


def test_guidance_embedding_is_refused_where_it_makes_no_sense(teacher, tiny_unet_folder):
    from stepdistill.models.loading import load_diffusers_score
    from stepdistill.models.lora import with_lora

    with pytest.raises(ValueError, match="objective.guidance_set.*class-conditional"):
        embed_guidance(load_diffusers_score(str(tiny_unet_folder)), 4.5)
    with pytest.raises(ValueError, match="objective.guidance_set.*generator.lora_rank=0"):
        embed_guidance(with_lora(teacher.score, 4), 4.5)
    once = embed_guidance(teacher.student_network(), 4.5)
    with pytest.raises(ValueError, match="already takes a guidance scale"):
        embed_guidance(once, 4.5)


def test_warm_start_pairs_use_the_scale_the_student_embeds():
    """The regression warm start regresses the student at its evaluation scale onto teacher pairs guided at that
    scale; without a guidance embedding, at the objective's teacher scale."""
    scm = lambda **k: SimpleNamespace(**{"guidance_scale": 1.0, "guidance_set": None, "eval_guidance": None, **k})  # noqa: E731
    assert warm_start_guidance(scm(guidance_set=[4.0, 4.5, 5.0])) == 4.5
    assert warm_start_guidance(scm(guidance_set=[4.0, 4.5, 5.0], eval_guidance=5.0)) == 5.0
    assert warm_start_guidance(scm(guidance_scale=2.0)) == 2.0
    assert warm_start_guidance(SimpleNamespace(name="ladd")) == 1.0  # objectives without guidance keys


def test_each_objective_names_the_teacher_its_warm_start_regresses_onto():
    """SiD keeps the teacher's scale in kappa4 (its guidance_scale does not exist): a SiD-LSG warm start regresses
    onto pairs of the kappa4-guided teacher, zero_cfg onto the unguided one; VSD onto its guidance_scale."""
    from stepdistill import registry
    from stepdistill.recipe import load_recipe

    def scale(*overrides):
        r = load_recipe(None, ["teacher.name=gmm", *overrides], data={"teacher": {}, "objective": {}})
        return registry.get("objective", r.objective.name).warm_start_guidance(r.objective)

    assert scale("objective.name=sid", "objective.kappa4=1.5", "objective.kappa1=1.5") == 1.5
    assert scale("objective.name=sid", "objective.kappa4=1.5", "objective.guidance=zero_cfg") == 1.0
    assert scale("objective.name=vsd", "objective.guidance_scale=3.0") == 3.0
    assert scale("objective.name=ladd") == 1.0
