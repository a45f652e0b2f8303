"""Multi-student distillation end to end: errors, one run per student, the routed ensemble, resume, export; and
teacher score matching for smaller students."""
import json

import pytest
import torch

from stepdistill.cli import main
from stepdistill.recipe import RecipeError, load_recipe
from stepdistill.run import load_run
from stepdistill.training.students import train
from stepdistill.training.trainer import Trainer, build

MSD = ["configs/toy/gmm_msd.yaml", "teacher.hidden=32", "generator.students=2", "train.iterations=4",
       "train.batch_size=64", "train.checkpoint_every=2", "eval.n=256"]


def test_students_must_fit_the_conditions(gmm_built):
    with pytest.raises(RecipeError, match=r"generator.students=5 is larger than the number of conditions \(4 classes"):
        gmm_built("teacher.conditional=true", "generator.students=5")
    with pytest.raises(RecipeError, match="teacher 'gmm' is unconditional: set generator.students=1 or "
                                          "teacher.conditional=true"):
        train(load_recipe("configs/toy/gmm_vsd.yaml", ["generator.students=2"]), "unused")
    with pytest.raises(RecipeError, match="generator.students must be >= 1, got 0"):
        gmm_built("generator.students=0")
    with pytest.raises(RecipeError, match=r"generator.width=0.5 .* set generator.tsm_iterations"):
        gmm_built("generator.width=0.5")
    built = gmm_built("teacher.conditional=true", "generator.students=2")
    assert built.classes is None and built.batch(200).cond.unique().tolist() == [0, 1, 2, 3]
    built.classes = [2, 3]  # what build(recipe, classes=[2, 3]) gives student 1 of 2
    assert built.batch(200).cond.unique().tolist() == [2, 3]


def test_two_students_train_route_resume_and_export(tmp_path, capsys, monkeypatch):
    out = tmp_path / "msd"
    assert main(["train", *MSD, "--outdir", str(out)]) == 0
    printed = "".join(capsys.readouterr())
    assert "student 1/2: classes 0-1" in printed and "student 2/2: classes 2-3" in printed
    for k in (0, 1):
        for name in ("recipe.yaml", "train_summary.json", "samples/final.png", "checkpoints/step_0000004"):
            assert (out / "students" / str(k) / name).exists(), (k, name)
        assert not (out / "students" / str(k) / "metrics.json").exists()  # only the ensemble is evaluated
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["student"]["routing"]["classes"] == [[0, 1], [2, 3]] and metrics["student"]["energy_distance"] > 0
    assert (out / "samples" / "final.png").exists() and (out / "recipe.yaml").exists()

    run = load_run(out)  # routes: each label's sample is its own student's
    assert run.student_steps == [4, 4]
    z, cond = torch.randn(8, 2), torch.arange(8) % 4
    both = run.student(z, cond)
    for k, classes in enumerate(run.student.classes()):
        rows = torch.isin(cond, torch.tensor(classes))
        torch.testing.assert_close(both[rows], run.student.students[k](z[rows], cond[rows]))
    assert main(["sample", "--run", str(out), "--n", "20", "--out", str(tmp_path / "s.npy")]) == 0

    # resume: finished students are skipped; an unfinished one resumes from its checkpoint
    (out / "students" / "1" / "train_summary.json").unlink()
    trained = []
    original = Trainer.run
    monkeypatch.setattr(Trainer, "run", lambda self: trained.append((self.outdir.name, self.classes)) or original(self))
    assert main(["train", *MSD, "train.seed=1", "--outdir", str(out)]) == 2  # a different recipe is refused
    assert main(["train", *MSD, "--outdir", str(out)]) == 0
    assert trained == [("1", [2, 3])]
    printed = "".join(capsys.readouterr())
    assert "student 1/2: classes 0-1: already trained" in printed and "resumed from iteration 4" in printed

    # export: one safetensors file with every student under students.k., the routing in its metadata
    from safetensors import safe_open

    path = tmp_path / "msd.safetensors"
    assert main(["export", "--run", str(out), "--format", "safetensors", "--out", str(path)]) == 0
    with safe_open(str(path), "pt") as f:
        routing = json.loads(f.metadata()["stepdistill.routing"])
        assert routing["classes"] == [[0, 1], [2, 3]] and routing["iterations"] == [4, 4]
        for k, student in enumerate(run.student.students):
            fresh = run.teacher.student_network().net
            fresh.load_state_dict({name[len(f"students.{k}."):]: f.get_tensor(name) for name in f.keys()
                                   if name.startswith(f"students.{k}.")})
            for name, v in student.net.net.state_dict().items():
                assert torch.equal(fresh.state_dict()[name], v), (k, name)


def test_diffusers_export_writes_one_pipeline_per_student(tmp_path, tiny_unet_folder):
    """Half-width UNet students (TSM on real data from data.path) of a 3-class teacher, exported for diffusers."""
    import numpy as np
    from diffusers import UNet2DModel

    np.savez(tmp_path / "real.npz", x=np.random.rand(12, 1, 8, 8).astype(np.float32), labels=np.arange(12) % 3)
    out = tmp_path / "run"
    args = ["train", "configs/fashion/vsd_1step.yaml", "teacher.name=diffusers", f"teacher.path={tiny_unet_folder}",
            "generator.students=2", "generator.warm_start_iterations=0", "generator.width=0.5",
            "generator.tsm_iterations=2",
            f"data.path={tmp_path / 'real.npz'}", "train.iterations=1", "train.batch_size=4", "train.max_minutes=0",
            "eval.at_end=false", "--outdir", str(out), "--quiet"]
    assert main(args) == 0
    assert json.loads((out / "students" / "1" / "train_summary.json").read_text())["loss/tsm"] > 0
    assert main(["export", "--run", str(out), "--format", "diffusers", "--out", str(tmp_path / "exp")]) == 0
    routing = json.loads((tmp_path / "exp" / "routing.json").read_text())
    assert routing["classes"] == [[0, 1], [2]] and routing["folders"] == ["student_0", "student_1"]
    run = load_run(out)
    for k, student in enumerate(run.student.students):
        unet = UNet2DModel.from_pretrained(tmp_path / "exp" / f"student_{k}", subfolder="unet")
        assert list(unet.config.block_out_channels) == [4, 8]  # the teacher's (8, 16) halved; GroupNorm groups: 4
        for name, v in student.net.net.state_dict().items():
            assert torch.equal(unet.state_dict()[name], v), (k, name)
        assert (tmp_path / "exp" / f"student_{k}" / "scheduler" / "scheduler_config.json").exists()
        folder = tmp_path / "exp" / f"student_{k}"
        assert json.loads((folder / "stepdistill.json").read_text())["classes"] == routing["classes"][k]
        readme = (folder / "README.md").read_text()  # its code loads by the folder's own name (relative since
        assert f'"{folder.name}"' in readme and ".tmp" not in readme and str(tmp_path) not in readme  # 2026-12-03)
    # sampling an exported student gives it only its own classes
    from stepdistill.export.diffusers_folder import sample_exported

    seen = []
    original = UNet2DModel.forward
    UNet2DModel.forward = lambda self, x, t, class_labels=None, **kw: seen.append(class_labels) or original(
        self, x, t, class_labels=class_labels, **kw)
    try:
        sample_exported(tmp_path / "exp" / "student_1", n=4, batch_size=4)
    finally:
        UNet2DModel.forward = original
    assert seen[0].tolist() == [2, 2, 2, 2]


def test_smaller_student_learns_the_teacher_by_score_matching(gmm_built):
    from stepdistill.diffusion.timesteps import uniform_t
    from stepdistill.training.tsm import teacher_score_matching

    b = gmm_built("teacher.conditional=true", "generator.width=0.5", "generator.tsm_iterations=1")
    student, teacher = b.nets.generator.net, b.nets.teacher
    assert student.net.hidden == 32  # teacher.hidden=64 in the fixture

    def x0_error():
        g = torch.Generator().manual_seed(0)
        cond = torch.arange(2048) % 4
        x0 = b.teacher.sample(2048, g, cond)
        t = uniform_t(2048, 0.0, 1.0, teacher.schedule)
        x_t = teacher.schedule.add_noise(x0, torch.randn(x0.shape, generator=g), t)
        with torch.no_grad():
            return float((student(x_t, t, cond).x0 - teacher(x_t, t, cond).x0).pow(2).mean())

    torch.manual_seed(0)
    before = x0_error()
    teacher_score_matching(student, teacher, b.teacher.real_data(), b.sample_cond, 3e-3, 150, 256, quiet=True)
    after = x0_error()
    assert after < 0.2 * before, (before, after)


def test_trainer_runs_tsm_once_and_starts_the_fake_score_from_it(tmp_path, monkeypatch):
    from stepdistill.training.state import load_latest, unprefixed

    r = load_recipe("configs/toy/gmm_vsd.yaml", ["teacher.hidden=32", "generator.width=0.5",
                                                 "generator.tsm_iterations=5", "train.iterations=0",
                                                 "train.batch_size=32",
                                                 "eval.at_end=false"])
    t = Trainer(r, tmp_path / "run", quiet=True)
    t.run()
    assert "loss/tsm" in t.last_logs
    _, weights, _ = load_latest(tmp_path / "run" / "checkpoints")
    gen, fake = unprefixed("generator", weights), unprefixed("fake_score", weights)
    assert all(torch.equal(gen["net." + k], v) for k, v in fake.items())
    import stepdistill.training.tsm as tsm

    monkeypatch.setattr(tsm, "teacher_score_matching", lambda *a, **k: pytest.fail("TSM repeated on resume"))
    Trainer(r, tmp_path / "run", quiet=True).run()
    assert build(r).nets.generator.net.net.hidden == 16
