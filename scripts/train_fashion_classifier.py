"""Train the Fashion-MNIST (16x16) feature classifier and the reference statistics of the 10k test set.

python scripts/train_fashion_classifier.py --out checkpoints/fashion-classifier --epochs 6
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stepdistill.data import fashion
from stepdistill.eval.features import FashionClassifier, extract, save_classifier
from stepdistill.eval.metrics import gaussian_stats

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="checkpoints/fashion-classifier")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    x, y = fashion.load("train")
    xt, yt = fashion.load("test")
    model = FashionClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = a.epochs * (len(x) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    start = time.time()
    for epoch in range(a.epochs):
        model.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x) - 127, 128):
            idx = perm[i:i + 128]
            xb = x[idx]
            xb = torch.where(torch.rand(len(xb), 1, 1, 1) < 0.5, xb.flip(-1), xb)  # horizontal flip augmentation
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(xt[i:i + 1000]).argmax(1) for i in range(0, len(xt), 1000)])
            acc = float(pred.eq(yt).float().mean())
        print(f"epoch {epoch + 1}: test accuracy {acc:.4f} ({time.time() - start:.0f}s)", flush=True)
    info = {"test_accuracy": round(acc, 4), "epochs": a.epochs, "seed": a.seed,
            "features": FashionClassifier.num_features,
            "train_seconds": round(time.time() - start), "input": "(N,1,16,16) in [-1,1], fashion-mnist 16x16"}
    save_classifier(model, a.out, info)
    mu, sigma = gaussian_stats(extract(model, xt))
    np.savez(Path(a.out) / "fashion16_test_stats.npz", mu=mu, sigma=sigma, n=len(xt))
    print(json.dumps(info))
