"""Hub ids load like folders: `teacher.path: org/name` is resolved by diffusers to the pipeline's snapshot in the
Hugging Face cache (offline here: a cache laid out by hand, as `hf download` leaves it), so an SDXL id is an SDXL
teacher, not an SD1.x one, and an id missing from the cache is an error that says how to get it."""
import shutil

import pytest
import torch

from stepdistill.teachers.sd import SDConfig, SDTeacher

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face cache holding a tiny SDXL pipeline as `tiny/sdxl` (refs/main -> snapshots/<commit>/)."""
    import huggingface_hub.constants
    from conftest import make_tiny_sdxl_folder

    folder = make_tiny_sdxl_folder(tmp_path / "sdxl")
    repo = tmp_path / "cache" / "models--tiny--sdxl"
    shutil.copytree(folder, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "prompts.txt").write_text("a red shirt\na blue bag\n")
    return folder, tmp_path / "prompts.txt"


def test_an_sdxl_hub_id_is_an_sdxl_teacher(hub_cache):
    folder, prompts = hub_cache
    by_id = SDTeacher(SDConfig(path="tiny/sdxl", prompts=str(prompts)))
    by_folder = SDTeacher(SDConfig(path=str(folder), prompts=str(prompts)))
    assert by_id.family == "sdxl" and by_id.folder.parent.name == "snapshots" and by_id.folder.name == COMMIT
    assert by_id.text.null == "zeros"  # SDXL's force_zeros_for_empty_prompt, read from the snapshot's index
    torch.testing.assert_close(by_id.text(["a red shirt"]), by_folder.text(["a red shirt"]))
    torch.testing.assert_close(by_id.score.time_ids, by_folder.score.time_ids)
    for a, b in zip(by_id.score.net.state_dict().values(), by_folder.score.net.state_dict().values()):
        assert torch.equal(a, b)


def test_an_uncached_hub_id_offline_says_how_to_get_it(hub_cache):
    _, prompts = hub_cache
    with pytest.raises(FileNotFoundError, match=r"could not fetch the diffusers pipeline 'tiny/nothing': it is not "
                                                r"in the Hugging Face cache and HF_HUB_OFFLINE=1: download it where "
                                                r"the hub is reachable \(`hf download tiny/nothing`\)"):
        SDTeacher(SDConfig(path="tiny/nothing", prompts=str(prompts)))
