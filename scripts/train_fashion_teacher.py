"""Train the bundled Fashion-MNIST teacher.

python scripts/train_fashion_teacher.py --out checkpoints/fashion-mnist --minutes 45
python scripts/train_fashion_teacher.py --out checkpoints/fashion-mnist --minutes 30 --init checkpoints/fashion-mnist
python scripts/train_fashion_teacher.py --param flow --split fit --out checkpoints/fashion-flow --minutes 75 --threads 1
"""
import argparse

import torch

from stepdistill.teachers.fashion_train import train_teacher

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="checkpoints/fashion-mnist")
    p.add_argument("--minutes", type=float, default=40.0, help="wall-clock training budget")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default=None, help="continue from an earlier output folder (e.g. the same --out)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--param", default="vp", choices=["vp", "flow"],
                   help="vp: DDPM cosine + v-prediction; flow: rectified flow with a smooth time embedding")
    p.add_argument("--split", default="train", choices=["train", "fit"],
                   help="train: all 60,000 images; fit: the first 50,000 (the last 10,000 are the validation split)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    train_teacher(a.out, a.minutes, batch_size=a.batch_size, lr=a.lr, seed=a.seed, init=a.init,
                  param=a.param, split=a.split)
