import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch a model hub
os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # recipes are referenced as configs/...


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def make_tiny_unet_folder(path, num_classes: int = 3, prediction_type: str = "v_prediction"):
    """A tiny class-conditional diffusers folder (unet/ + scheduler/ + stepdistill.json), built from config."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), num_class_embeds=num_classes + 1)
    unet.save_pretrained(path / "unet")
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)
    scheduler.save_pretrained(path / "scheduler")
    (path / "stepdistill.json").write_text(json.dumps({"conditioning": "class", "null_label": num_classes}))
    return path


@pytest.fixture
def tiny_unet_folder(tmp_path):
    return make_tiny_unet_folder(tmp_path / "teacher")


@pytest.fixture
def gmm_built():
    """build() for a gmm recipe with a narrow student MLP and the objective's defaults: gmm_built("objective.name=sid",
    ...), or gmm_built(..., recipe="configs/toy/...")."""
    from stepdistill.recipe import load_recipe
    from stepdistill.train.trainer import build

    def make(*overrides: str, recipe: str | None = None):
        data = None if recipe else {"teacher": {"name": "gmm"}, "objective": {"name": "vsd"}}
        return build(load_recipe(recipe, ["teacher.hidden=64", *overrides], data=data))

    return make


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (transformers 5 no longer exports it)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def make_tiny_clip_folder(path, image_size: int = 32):
    """A tiny CLIPModel + CLIPProcessor folder built offline: a character-level BPE tokenizer (every byte, no merges)
    written locally, 2-layer text and vision towers."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    torch.manual_seed(0)
    tower = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    config = CLIPConfig(text_config=dict(vocab_size=len(vocab), max_position_embeddings=77, **tower,
                                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                                         pad_token_id=vocab["<|endoftext|>"]),
                        vision_config=dict(image_size=image_size, patch_size=8, **tower), projection_dim=16)
    CLIPModel(config).save_pretrained(path)
    size = {"height": image_size, "width": image_size}
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=size),
                  tokenizer=tokenizer).save_pretrained(path)
    return path
