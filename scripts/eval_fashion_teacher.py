"""Measure the bundled Fashion-MNIST teacher at several NFE and record it in checkpoints/fashion-mnist/quality.json.

python scripts/eval_fashion_teacher.py --nfe 1 4 35 --n 10000
python scripts/eval_fashion_teacher.py --nfe 35 --split val   (against the held-out training images, for selection)

Each entry carries the full evaluation protocol; `stepdistill eval` reuses an entry only when its protocol (teacher
and feature-network hashes included) equals the one it would compute, so a retrained teacher is never misreported.
"""
import argparse
import json
import time
from pathlib import Path

import torch

from stepdistill.eval.harness import domain_score, generate_teacher, protocol
from stepdistill.recipe import load_recipe
from stepdistill.teachers import build_teacher

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nfe", type=int, nargs="+", default=[1, 4, 35])
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance-scale", type=float, default=1.0)
    p.add_argument("--recipe", default="configs/fashion/vsd_1step.yaml")
    p.add_argument("--split", default="test", choices=["test", "val"], help="the reference (eval.split)")
    a = p.parse_args()
    torch.set_num_threads(2)
    for nfe in a.nfe:
        recipe = load_recipe(a.recipe, [f"eval.n={a.n}", f"eval.seed={a.seed}", f"eval.teacher_nfe={nfe}",
                                        f"eval.guidance_scale={a.guidance_scale}", f"eval.split={a.split}"])
        teacher = build_teacher(recipe.teacher)
        start = time.time()
        x, used = generate_teacher(teacher, a.n, a.seed, recipe.eval.batch_size, nfe, a.guidance_scale, quiet=False)
        entry = {"protocol": protocol(recipe, teacher), "teacher": {"nfe": used, **domain_score(teacher, x, a.split)},
                 "seconds": round(time.time() - start, 1),
                 "command": f"python scripts/eval_fashion_teacher.py --recipe {a.recipe} --nfe {nfe} --n {a.n} "
                            f"--seed {a.seed} --guidance-scale {a.guidance_scale}"
                            + (f" --split {a.split}" if a.split != "test" else "")}
        path = Path(teacher.folder) / "quality.json"
        data = json.loads(path.read_text()) if path.exists() else {"entries": []}
        data["entries"] = [e for e in data["entries"] if e["protocol"] != entry["protocol"]] + [entry]
        path.write_text(json.dumps(data, indent=2))
        print(json.dumps(entry["teacher"]), f"{entry['seconds']} s", flush=True)
