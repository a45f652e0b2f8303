"""How fast a teacher's output moves with its time input: the consistency family's tangent carries this term.

python scripts/time_sensitivity.py checkpoints/fashion-mnist checkpoints/fashion-flow

For each teacher: held-out images noised to canonical time t, then the RMS of d(network output)/dt at fixed x_t by
central differences with two step sizes h (a smooth function of t gives the same number for both). Network outputs
are unit-scale for both bundled teachers (v-prediction and flow velocity), so the numbers compare directly.
"""
import argparse

import torch

from stepdistill.data import fashion
from stepdistill.models.loading import load_diffusers_score

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+")
    p.add_argument("--n", type=int, default=256)
    a = p.parse_args()
    torch.set_num_threads(2)
    x0, y = fashion.load("val")
    x0, y = x0[: a.n], y[: a.n]
    times = [0.1, 0.3, 0.5, 0.7, 0.9]
    print("| teacher | time input | h | " + " | ".join(f"t={t}" for t in times) + " |")
    print("|---|---|---|" + "---|" * len(times))
    for folder in a.folders:
        score = load_diffusers_score(folder).eval()
        native = score.schedule.native
        for h in (1e-2, 1e-3):
            row = []
            for t_value in times:
                g = torch.Generator().manual_seed(0)
                t = torch.full((len(x0),), t_value)
                x_t = score.schedule.add_noise(x0, torch.randn(x0.shape, generator=g), t)
                with torch.no_grad():
                    hi = score.net(x_t, native(t + h).float(), y).sample
                    lo = score.net(x_t, native(t - h).float(), y).sample
                row.append(((hi - lo) / (2 * h)).pow(2).mean().sqrt().item())
            span = f"0..{float(native(torch.ones(1))):g}"
            print(f"| {folder} | {span} | {h:g} | " + " | ".join(f"{v:.2f}" for v in row) + " |", flush=True)
