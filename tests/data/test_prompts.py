import json

import pytest

from stepdistill.data.prompts import read_prompts


def test_txt_csv_and_jsonl_give_the_same_prompts(tmp_path):
    prompts = ["a red shirt", "a bag, on a table", 'a "quoted" shoe']
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    (tmp_path / "p.csv").write_text('id,caption\n1,a red shirt\n2,"a bag, on a table"\n3,"a ""quoted"" shoe"\n')
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n\n" for i, p in
                                              enumerate(prompts)))
    for name in ("p.txt", "p.csv", "p.jsonl"):
        assert read_prompts(tmp_path / name) == prompts, name


def test_bad_prompt_files_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        read_prompts(tmp_path / "none.txt")
    (tmp_path / "e.txt").write_text("a shirt\n  \na bag\n")
    with pytest.raises(ValueError, match=r"empty prompt on line\(s\) 2"):
        read_prompts(tmp_path / "e.txt")
    (tmp_path / "e.csv").write_text("prompt\na shirt\n\"\"\n")
    with pytest.raises(ValueError, match=r"empty prompt on line\(s\) 3"):
        read_prompts(tmp_path / "e.csv")
    (tmp_path / "c.csv").write_text("id,label\n1,shirt\n")
    with pytest.raises(ValueError, match="no prompt column; expected one of prompt, text, caption, found id, label"):
        read_prompts(tmp_path / "c.csv")
    (tmp_path / "j.jsonl").write_text('{"prompt": "a shirt"}\n{"prompt": 3}\n')
    with pytest.raises(ValueError, match="line 2: the prompt is int"):
        read_prompts(tmp_path / "j.jsonl")
    (tmp_path / "k.jsonl").write_text('{"prompt": "a shirt"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_prompts(tmp_path / "k.jsonl")
    (tmp_path / "z.txt").write_text("")
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompts(tmp_path / "z.txt")
