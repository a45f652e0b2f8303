"""The overhead benchmark (`stepdistill bench --speed`) at a tiny size: its ratio is reported, not asserted."""
import math

import torch
import yaml

from stepdistill.cli import main
from stepdistill.speed import measure_recipe


def test_sid_step_is_five_forward_and_four_backward_passes_replayed_alone(tiny_unet_folder, tmp_path):
    torch.set_num_threads(1)  # tiny networks: a second thread only adds contention on a shared CPU
    recipe = tmp_path / "sid.yaml"
    recipe.write_text(yaml.safe_dump({"teacher": {"name": "diffusers", "path": str(tiny_unet_folder)},
                                      "objective": {"name": "sid"}, "train": {"batch_size": 4}}))
    r = measure_recipe(str(recipe), iterations=2, warmup=1)
    # fake phase: generator (no grad), fake score (+ backward); generator phase: generator, teacher and fake score,
    # each with a backward (SiD's gradient flows through the frozen teacher and fake score into x_t)
    assert r.passes == {"forward": 5, "backward": 4, "jvp": 0}
    assert r.step_ms > 0 and r.passes_ms > 0 and math.isfinite(r.ratio)
    print(f"tiny UNet sid: step {r.step_ms:.1f} ms, passes {r.passes_ms:.1f} ms, ratio {r.ratio:.2f}")


def test_bench_speed_cli_writes_the_table(tmp_path, capsys):
    report = tmp_path / "speed.md"
    assert main(["bench", "--speed", "configs/toy/gmm_vsd.yaml", "configs/toy/gmm_scm.yaml", "train.batch_size=32",
                 "teacher.hidden=32", "--iterations", "5", "--warmup", "1", "--report", str(report)]) == 0
    text = report.read_text()
    assert "| `gmm_vsd` | vsd |" in text and "| `gmm_scm` | scm |" in text and "n/a (CPU)" in text
    scm_row = next(line for line in text.splitlines() if "`gmm_scm`" in line)
    assert scm_row.split("|")[3].strip().endswith(", 2")  # sCM's tangent: forward-mode AD through teacher + student
    print(capsys.readouterr().out)
