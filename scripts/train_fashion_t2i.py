"""Train the bundled text-to-image Fashion-MNIST teacher (a miniature Stable Diffusion pipeline folder).

python scripts/train_fashion_t2i.py --out checkpoints/fashion-t2i --vae-minutes 6 --unet-minutes 45
"""
import argparse
import json

import torch

from stepdistill.teachers.fashion_t2i_train import train_fashion_t2i

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="checkpoints/fashion-t2i")
    p.add_argument("--vae-minutes", type=float, default=6.0, help="wall-clock budget of the autoencoder")
    p.add_argument("--unet-minutes", type=float, default=45.0, help="wall-clock budget of the denoiser")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(json.dumps(train_fashion_t2i(a.out, a.vae_minutes, a.unet_minutes, a.seed), indent=2))
