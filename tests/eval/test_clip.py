"""CLIP score through torchmetrics from a local folder (a tiny CLIP built from config), and its errors."""
import pytest
import torch
from conftest import make_tiny_clip_folder

from stepdistill.data.prompts import read_prompts
from stepdistill.eval.clip import clip_model_id, clip_score

PROMPTS = ["a red shirt", "a blue bag", "an ankle boot", "a dress " * 40]  # the last is over 77 tokens: truncated


def _independent(folder, images, prompts, clip: bool = True) -> float:
    """100 x mean cosine of the projected embeddings, clipped at 0, computed with transformers alone."""
    from transformers import CLIPModel, CLIPProcessor

    model, proc = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    with torch.no_grad():
        img = model.get_image_features(proc(images=list(images), return_tensors="pt")["pixel_values"]).pooler_output
        tok = proc(text=prompts, return_tensors="pt", padding=True)
        txt = model.get_text_features(tok["input_ids"][:, :77], tok["attention_mask"][:, :77]).pooler_output
    raw = 100 * torch.nn.functional.cosine_similarity(img, txt).mean().item()
    return max(raw, 0.0) if clip else raw


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return make_tiny_clip_folder(tmp_path_factory.mktemp("clip") / "tiny")


def test_clip_score_equals_an_independent_computation(clip_folder):
    from transformers import CLIPModel

    images = (torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    if _independent(clip_folder, images, PROMPTS, clip=False) < 0:  # a random model: make the mean cosine positive,
        model = CLIPModel.from_pretrained(clip_folder)                # so the clipping at 0 cannot hide a mismatch
        model.text_projection.weight.data.neg_()
        model.save_pretrained(clip_folder)
    want = _independent(clip_folder, images, PROMPTS)
    assert want > 0
    assert clip_score(images, PROMPTS, clip_folder) == pytest.approx(want, rel=1e-4, abs=1e-4)
    assert clip_model_id(clip_folder).startswith("tiny (weights sha256 ")
    gray = clip_score(images[:, :1], PROMPTS, clip_folder)  # grayscale repeated to RGB
    assert gray == pytest.approx(_independent(clip_folder, images[:, :1].expand(-1, 3, -1, -1), PROMPTS), abs=1e-4)


def test_clip_errors(clip_folder, tmp_path):
    images = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
    with pytest.raises(FileNotFoundError, match="--clip PATH"):
        clip_score(images, ["a", "b"], None)
    with pytest.raises(FileNotFoundError, match="config.json missing"):
        clip_score(images, ["a", "b"], tmp_path)
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        clip_score(images, ["a", "b", "c"], clip_folder)
    (tmp_path / "p.txt").write_text("a shirt\n\na bag\n")
    with pytest.raises(ValueError, match="empty prompt on line"):
        read_prompts(tmp_path / "p.txt")


def test_clip_from_the_cli(clip_folder, tmp_path, capsys):
    import json

    import numpy as np
    from PIL import Image

    from stepdistill.cli import main

    for i in range(2):
        Image.fromarray(np.full((16, 16, 3), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "prompts.txt").write_text("a shirt\na bag\n")
    out = tmp_path / "clip.json"
    assert main(["eval", "--folder", str(tmp_path), "--metrics", "clip", "--prompts", str(tmp_path / "prompts.txt"),
                 "--clip", str(clip_folder), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["scores"]["clip_score"] >= 0 and result["protocol"]["clip_model"].startswith("tiny")
    assert main(["eval", "--folder", str(tmp_path), "--metrics", "clip", "--prompts", str(tmp_path / "prompts.txt")]) \
        == 2 and "--clip PATH" in capsys.readouterr().err
