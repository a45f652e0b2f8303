"""The command line end to end, in-process, on tiny recipes."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from stepdistill.cli import main

GMM = ["configs/toy/gmm_vsd.yaml", "teacher.hidden=32", "train.iterations=6",
       "train.checkpoint_every=3", "eval.n=512"]


def test_gmm_train_sample_eval_export(tmp_path, capsys):
    run = tmp_path / "gmm"
    assert main(["train", *GMM, "--outdir", str(run), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "student / teacher" in out
    assert f"run folder: {run}  (samples/final.png, metrics.json, stats.jsonl, tb/)" in out
    for name in ("recipe.yaml", "stats.jsonl", "metrics.json", "samples/final.png", "checkpoints/step_0000006"):
        assert (run / name).exists(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["student"]["nfe"] == 1 and metrics["teacher"]["nfe"] == 34
    assert metrics["student"]["energy_distance"] > 0 and metrics["protocol"]["n"] == 512

    assert main(["sample", "--run", str(run), "--n", "100", "--seed", "3", "--out", str(tmp_path / "s.npy")]) == 0
    a = np.load(tmp_path / "s.npy")
    assert a.shape == (100, 2) and np.isfinite(a).all()
    main(["sample", "--run", str(run), "--n", "100", "--seed", "3", "--out", str(tmp_path / "s2.npy")])
    assert np.array_equal(a, np.load(tmp_path / "s2.npy"))

    (run / "metrics.json").unlink()
    assert main(["eval", "--run", str(run), "eval.n=256"]) == 0
    assert json.loads((run / "metrics.json").read_text())["protocol"]["n"] == 256
    assert main(["eval", "--run", str(run), "eval.n=256", "--steps", "2"]) == 0  # the few-step rule, scored apart
    two = json.loads((run / "metrics_2step.json").read_text())
    assert two["student"]["nfe"] == 2 and json.loads((run / "metrics.json").read_text())["student"]["nfe"] == 1
    assert main(["eval", "--run", str(run), "eval.n=256", "eval.split=val", "--steps", "2"]) == 0  # another split
    val, test = (json.loads((run / f).read_text())["protocol"] for f in ("metrics_val_2step.json", "metrics.json"))
    assert val["reference"] != test["reference"] and test["n"] == 256  # metrics.json kept its own split's score

    for step in (3, 6):  # an earlier checkpoint's student; the last one's is the run's own
        args = ["sample", "--run", str(run), "--checkpoint", str(step), "--n", "100", "--seed", "3"]
        assert main([*args, "--out", str(tmp_path / f"at{step}.npy")]) == 0
    assert np.array_equal(a, np.load(tmp_path / "at6.npy")) and not np.array_equal(a, np.load(tmp_path / "at3.npy"))
    assert main(["eval", "--run", str(run), "eval.n=256", "--checkpoint", "3"]) == 0
    assert json.loads((run / "metrics_at3.json").read_text())["student"] != \
        json.loads((run / "metrics.json").read_text())["student"]
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--checkpoint", "4"]) == 2
    assert "no checkpoint of iteration 4 in " in (err := capsys.readouterr().err) and "(there are: 3, 6;" in err
    with open(run / "checkpoints" / "step_0000003" / "weights.safetensors", "r+b") as f:
        f.truncate(100)
    assert main(["sample", "--run", str(run), "--checkpoint", "3", "--out", str(tmp_path / "x.npy")]) == 2
    assert "step_0000003 is damaged: weights.safetensors does not match its recorded SHA-256" in capsys.readouterr().err

    assert main(["export", "--run", str(run), "--format", "safetensors", "--out", str(tmp_path / "g.safetensors")]) == 0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "g.safetensors"), "pt") as f:
        assert "vsd" in f.metadata()["stepdistill.recipe"] and f.metadata()["stepdistill.steps"] == "1"
    assert main(["export", "--run", str(run), "--format", "diffusers", "--out", str(tmp_path / "d")]) == 2
    assert "Use --format safetensors instead" in capsys.readouterr().err


def test_rerun_resumes_instead_of_restarting(tmp_path, capsys):
    run = tmp_path / "gmm"
    main(["train", *GMM, "train.iterations=3", "eval.at_end=false", "--outdir", str(run), "--quiet"])
    main(["train", *GMM, "eval.at_end=false", "train.log_with=[]", "--outdir", str(run)])
    captured = capsys.readouterr()
    assert "resumed from iteration 3" in captured.out + captured.err
    # the banner lists what exists: no metrics.json without the final evaluation
    assert f"run folder: {run}  (samples/final.png, stats.jsonl, tb/)" in captured.out
    steps = [json.loads(line)["step"] for line in (run / "stats.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 6



def test_a_run_folder_saved_with_the_old_iteration_keys_resumes(tmp_path, capsys):
    run = tmp_path / "gmm"
    main(["train", *GMM, "train.iterations=3", "eval.at_end=false", "--outdir", str(run), "--quiet"])
    saved = (run / "recipe.yaml").read_text()
    assert "  iterations: 3\n" in saved and "  warm_start_iterations: 0\n" in saved
    (run / "recipe.yaml").write_text(saved.replace("  iterations: 3\n", "  steps: 3\n")
                                     .replace("warm_start_iterations:", "warm_start_steps:"))
    with pytest.warns(FutureWarning, match="train.steps is now train.iterations"):
        assert main(["train", *GMM, "train.steps=6", "eval.at_end=false", "--outdir", str(run)]) == 0
    assert "resumed from iteration 3" in "".join(capsys.readouterr())
    steps = [json.loads(line)["step"] for line in (run / "stats.jsonl").read_text().splitlines()]
    assert steps[-1] == 6

def test_bad_input_gives_clear_errors(tmp_path, capsys):
    assert main(["train", *GMM, "train.bogus=1", "--outdir", str(tmp_path / "x")]) == 2
    assert "unknown key train.bogus" in capsys.readouterr().err
    assert main(["train", "configs/toy/gmm_vsd.yaml", "teacher.name=diffusers", "--outdir", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "unknown keys teacher.means, teacher.std; allowed in teacher: name, path, subfolder" in err
    assert main(["train", "configs/fashion/vsd_1step.yaml", "teacher.path=./missing_teacher",
                 "--outdir", str(tmp_path / "y")]) == 2
    assert "teacher folder './missing_teacher' not found; looked in" in capsys.readouterr().err
    assert main(["sample", "--run", str(tmp_path / "nothing"), "--out", "x.png"]) == 2
    assert "not a training run" in capsys.readouterr().err


@pytest.mark.parametrize("steps,start_t,timesteps", [(1, 1.0, [999]), (2, 1.0, [999, 499]),
                                                     (1, 0.4, [399]), (2, 0.4, [399, 199])])
def test_diffusers_export_loads_in_plain_diffusers_and_matches_our_samples(tmp_path, tiny_unet_folder, steps, start_t,
                                                                           timesteps):
    """start_t 0.4 is DMD2's SDXL one-step setting (pure noise, timestep 399): the exported scheduler's defaults give
    the start time too, on the teacher's own alphabar_t."""
    from diffusers import LCMScheduler, UNet2DModel

    run = tmp_path / "run"
    args = ["train", "configs/fashion/vsd_1step.yaml", "teacher.name=diffusers", f"teacher.path={tiny_unet_folder}",
            f"generator.steps={steps}", f"generator.start_t={start_t}", "train.iterations=2", "train.batch_size=4",
            "eval.at_end=false", "train.checkpoint_every=2", "--outdir", str(run), "--quiet"]
    assert main(args) == 0
    assert (run / "samples" / "final.png").exists()
    assert main(["sample", "--run", str(run), "--n", "6", "--seed", "7", "--out", str(tmp_path / "ours")]) == 0
    assert main(["export", "--run", str(run), "--format", "diffusers", "--out", str(tmp_path / "exp")]) == 0

    unet = UNet2DModel.from_pretrained(str(tmp_path / "exp"), subfolder="unet")
    scheduler = LCMScheduler.from_pretrained(str(tmp_path / "exp"), subfolder="scheduler")
    scheduler.set_timesteps(steps)  # no custom timesteps needed: the config encodes the student's steps
    assert scheduler.timesteps.tolist() == timesteps and scheduler.init_noise_sigma == 1.0
    if start_t < 1:
        teacher = LCMScheduler.from_pretrained(str(tiny_unet_folder), subfolder="scheduler")
        assert torch.equal(scheduler.alphas_cumprod, teacher.alphas_cumprod[:400])  # the teacher's own alphabar_t
        readme = (tmp_path / "exp" / "README.md").read_text()
        assert "timestep 399" in readme and "generator.start_t = 0.4" in readme
    readme = (tmp_path / "exp" / "README.md").read_text()
    assert 'from_pretrained("exp"' in readme and str(tmp_path) not in readme  # relative: the export can move
    meta = json.loads((tmp_path / "exp" / "stepdistill.json").read_text())
    assert meta["timesteps"] == timesteps and (meta["start_t"], meta["start_noise"]) == (start_t, "pure")
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(6, 1, 8, 8, generator=gen) * scheduler.init_noise_sigma
    labels = torch.arange(6) % 3
    for t in scheduler.timesteps:
        with torch.no_grad():
            x = scheduler.step(unet(x, t, class_labels=labels).sample, t, x, generator=gen).prev_sample
    theirs = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].numpy()
    ours = np.stack([np.array(Image.open(tmp_path / "ours" / f"{i:05d}.png")) for i in range(6)])
    assert np.abs(theirs.astype(int) - ours.astype(int)).max() <= 1  # same images, up to rounding at a pixel edge
    # `sample --export` runs that same loop (so exported models can be evaluated: eval --folder)
    assert main(["sample", "--export", str(tmp_path / "exp"), "--n", "6", "--seed", "7", "--out",
                 str(tmp_path / "exported")]) == 0
    exported = np.stack([np.array(Image.open(tmp_path / "exported" / f"{i:05d}.png")) for i in range(6)])
    assert np.array_equal(exported, theirs)
    # in several batches too: the scheduler starts each batch afresh, as a pipeline call does
    for source, out in (("--run", run), ("--export", tmp_path / "exp")):
        assert main(["sample", source, str(out), "--n", "6", "--batch-size", "4", "--seed", "7", "--out",
                     str(tmp_path / f"batched{source}")]) == 0
    a, b = (np.stack([np.array(Image.open(tmp_path / f"batched{s}" / f"{i:05d}.png")) for i in range(6)]).astype(int)
            for s in ("--run", "--export"))
    assert np.abs(a - b).max() <= 1


def test_export_never_deletes_a_folder_that_is_not_an_export(tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "mine"
    assert main(["train", "configs/toy/gmm_vsd.yaml", "train.iterations=2", "train.batch_size=8", "eval.at_end=false",
                 "--outdir", str(run), "--quiet"]) == 0
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    from stepdistill.export.diffusers_folder import publish, staging

    with pytest.raises(FileExistsError, match="exists and is not a stepdistill export"):
        staging(out)
    assert (out / "notes.txt").read_text() == "keep me"
    (out / "notes.txt").unlink()  # an empty folder, or a previous export, is replaced
    tmp = staging(out)
    (tmp / "stepdistill.json").write_text("{}")
    publish(tmp, out)
    assert (out / "stepdistill.json").exists() and not tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "run"]  # no staging or old copy left behind


def test_dry_run_prints_the_recipe_and_networks_and_writes_nothing(tmp_path, capsys):
    # overrides are accepted after options too
    assert main(["train", *GMM, "--dry-run", "--outdir", str(tmp_path / "d"), "teacher.means=[[0,2],[2,0]]"]) == 0
    out = capsys.readouterr().out
    assert "means:\n  - [0.0, 2.0]" in out or "means: [[0.0, 2.0], [2.0, 0.0]]" in out
    assert "# generator:" in out and "# fake_score:" in out and "trains generator, fake_score" in out
    assert not (tmp_path / "d").exists()


def test_every_subcommand_has_help_with_an_example(capsys):
    for cmd in ("train", "sample", "eval", "eval-ref", "bench", "export"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "examples:" in capsys.readouterr().out


def test_every_argument_says_what_it_does():
    from stepdistill.cli import _parser

    parser = _parser()
    commands = next(a for a in parser._actions if a.choices and "train" in a.choices).choices
    silent = [f"{name} {' '.join(a.option_strings) or a.dest}" for name, sub in commands.items()
              for a in sub._actions if not a.help and a.dest != "help"]
    assert not silent, f"arguments without --help text: {silent}"


def test_quiet_also_silences_the_libraries_loading_bars(tmp_path):
    import diffusers
    import transformers

    try:
        assert main(["train", *GMM, "--dry-run", "--quiet", "--outdir", str(tmp_path / "d")]) == 0
        assert not diffusers.utils.logging.is_progress_bar_enabled()
        assert not transformers.utils.logging.is_progress_bar_enabled()
    finally:
        diffusers.utils.logging.enable_progress_bar()
        transformers.utils.logging.enable_progress_bar()
