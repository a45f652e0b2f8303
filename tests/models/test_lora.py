import pytest
import torch

from stepdistill.models.lora import is_lora, load_saved_state, saved_state, with_lora
from stepdistill.teachers.sd import SDConfig, SDTeacher


@pytest.fixture
def sd_teacher(tiny_sd_folder):
    return SDTeacher(SDConfig(path=str(tiny_sd_folder), prompts=str(tiny_sd_folder.parent / "prompts.txt")))


def test_lora_student_shares_the_frozen_teacher_and_starts_equal_to_it(sd_teacher):
    base = sd_teacher.score
    student = with_lora(base, rank=4, alpha=8)
    assert is_lora(student) and not is_lora(base)
    q = student.net.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert q.base_layer.weight is base.net.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
    assert q.scaling["default"] == 2.0  # alpha / rank
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert not any(p.requires_grad for p in base.parameters())
    x, t, c = torch.randn(2, 4, 8, 8), torch.full((2,), 0.7), sd_teacher.sample_cond(2)
    assert torch.equal(student(x, t, c).x0, base(x, t, c).x0)  # lora_B starts at zero
    # a step on the adapter moves the student only
    loss = student(x, t, c).x0.square().mean()
    loss.backward()
    with torch.no_grad():
        for p in student.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    assert not torch.allclose(student(x, t, c).x0, base(x, t, c).x0)
    state = saved_state(student)
    assert set(state) == {n for n, p in student.named_parameters() if p.requires_grad}
    other = with_lora(base, rank=4, alpha=8)
    load_saved_state(other, state)
    assert torch.equal(other(x, t, c).x0, student(x, t, c).x0)
    with pytest.raises(ValueError, match="does not fit this network"):
        load_saved_state(with_lora(base, rank=2), state)


def test_bad_lora_settings_name_the_layer_and_the_fix(sd_teacher):
    with pytest.raises(ValueError, match=r"lora_rank=40 is larger than layer down_blocks\.0\.attentions\.0\."
                                         r"transformer_blocks\.0\.attn1\.to_q \(16 -> 16\).*rank <= 16"):
        with_lora(sd_teacher.score, rank=40)
    with pytest.raises(ValueError, match=r"lora_targets \['to_z'\] match no module"):
        with_lora(sd_teacher.score, rank=4, targets=["to_z"])
    with pytest.raises(ValueError, match="selects .*norm.*LoRA adapts Linear and Conv2d"):
        with_lora(sd_teacher.score, rank=4, targets=["norm1"])
    with pytest.raises(ValueError, match="lora_rank must be >= 1"):
        with_lora(sd_teacher.score, rank=0)
