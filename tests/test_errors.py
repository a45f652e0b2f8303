"""The error contract of the command line: a problem the user can fix (stepdistill.errors.UserError) is one line and
exit code 2; anything else is a bug and keeps its traceback; STEPDISTILL_DEBUG=1 shows the traceback of user errors
too. An AST scan keeps the package's user-facing raises in the family: a plain ValueError / KeyError /
FileNotFoundError left in stepdistill/ must be listed below with the reason it signals a bug, not bad input."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from stepdistill import cli
from stepdistill.errors import InputError, MissingFileError, UserError

PACKAGE = Path(__file__).resolve().parents[1] / "stepdistill"
EXPORT = ["export", "--run", "some-run", "--format", "safetensors", "--out", "student.safetensors"]


def _raising(error: Exception):
    def command(args):
        raise error
    return command


def test_an_internal_error_keeps_its_traceback(monkeypatch, capsys):
    monkeypatch.setattr(cli, "cmd_export", _raising(ValueError("an invariant broke")))
    with pytest.raises(ValueError, match="an invariant broke") as info:
        cli.main(EXPORT)
    assert not isinstance(info.value, UserError)
    assert any(entry.name == "main" and Path(entry.path).name == "cli.py" for entry in info.traceback)
    assert capsys.readouterr().err == ""  # nothing printed in its place


def test_a_user_error_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.delenv("STEPDISTILL_DEBUG", raising=False)
    monkeypatch.setattr(cli, "cmd_export", _raising(InputError("--out x.txt: give a path ending in .safetensors")))
    assert cli.main(EXPORT) == 2
    assert capsys.readouterr().err == "stepdistill export: error: --out x.txt: give a path ending in .safetensors\n"


def test_a_missing_run_folder_is_a_user_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("STEPDISTILL_DEBUG", raising=False)
    args = ["export", "--run", str(tmp_path / "nope"), "--format", "safetensors", "--out", str(tmp_path / "s.st")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "is not a training run" in err, err
    monkeypatch.setenv("STEPDISTILL_DEBUG", "1")
    with pytest.raises(MissingFileError):
        cli.main(args)


def test_stepdistill_debug_re_raises_a_user_error(monkeypatch, capsys):
    monkeypatch.setenv("STEPDISTILL_DEBUG", "1")
    monkeypatch.setattr(cli, "cmd_export", _raising(InputError("bad value")))
    with pytest.raises(InputError, match="bad value"):
        cli.main(EXPORT)
    assert capsys.readouterr().err == ""


# Plain builtins left in the package: (file under stepdistill/, builtin, a fragment of the call's source) -> why it
# is a bug rather than something the user can fix. A new user-facing check raises from stepdistill.errors instead.
ALLOWED = {
    ("diffusion/timesteps.py", "ValueError", "need 0 <= t_min <= t_max <= 1"):
        "the objectives' time ranges are validated with their configs; this guards the maths helper",
    ("eval/features.py", "ValueError", "expected images of shape (N, 1, 16, 16)"):
        "the harness only passes the Fashion teacher's own images",
    ("eval/inception.py", "ValueError", "scripted convolutions onto"):
        "the weights file was already checked to be the FID Inception: a mismatch is a mapping bug",
    ("eval/inception.py", "ValueError", "convolution {s}"): "as above: the convolution mapping itself is wrong",
    ("eval/inception.py", "ValueError", "unmapped torch-fidelity keys"): "as above",
    ("eval/metrics.py", "ValueError", "statistics do not match"): "both sides come from the same feature extractor",
    ("eval/metrics.py", "ValueError", "need dim >= 1 and 0 < probability < 1"): "called with constants",
    ("eval/metrics.py", "ValueError", "means must be a non-empty (K, D) array"):
        "teacher.means is validated by the gmm teacher first (RecipeError)",
    ("eval/metrics.py", "ValueError", "positive numbers, got {w}"): "teacher.weights: as above",
    ("eval/metrics.py", "ValueError", "std must be positive"): "teacher.std: as above",
    ("eval/metrics.py", "ValueError", "do not match means of dimension"): "samples come from the same teacher",
    ("kernels/jvp_attention.py", "ValueError", "expected q [B, H, Nq, D]"): "the attention processor's own call",
    ("kernels/jvp_attention.py", "ValueError", "q, k, v must share one of"): "the processor falls back before this",
    ("kernels/jvp_attention.py", "ValueError", "head dim"): "the processor falls back before this",
    ("models/conditioning.py", "ValueError", "pooled embedding of width"): "the encoders are the pipeline's own",
    ("models/multi_student.py", "ValueError", "a MultiStudent needs at least one student"):
        "the students are built from one recipe; generator.students >= 1 is a recipe rule",
    ("models/nasa.py", "ValueError", "negative prompt embeddings must be"): "the embeddings are encoded by the code",
    ("models/score.py", "ValueError", "needs null_label"): "teachers build their ScoreModel with it",
    ("models/score.py", "ValueError", "this network embeds a guidance scale"): "set when the student is built",
    ("models/score.py", "ValueError", "per-sample guidance scales for a batch"): "the objective draws one per sample",
    ("models/score.py", "ValueError", "has no null embedding"): "text teachers build their ScoreModel with it",
    ("objectives/base.py", "KeyError", "this run has no {name} network"):
        "an objective declares the networks it needs (needs_for): asking for another is a bug",
    ("objectives/base.py", "ValueError", "keeps no state, but the checkpoint has"):
        "resume refuses a different recipe first; a state it cannot read is a versioning bug",
    ("objectives/fdiv.py", "ValueError", "FDiv keeps only ratio_bins"): "as above",
    ("objectives/ladd.py", "ValueError", "needs real samples in Batch.x0"):
        "build asks for real data (training.build.real_data, a RecipeError) when the objective needs it",
    ("objectives/sid.py", "ValueError", "needs real samples in Batch.x0"): "as above",
    ("objectives/terms.py", "ValueError", "needs real samples in Batch.x0"): "as above",
}
CHECKED = ("ValueError", "KeyError", "FileNotFoundError")


def plain_raises() -> list[tuple[str, str, str, int]]:
    """(file, builtin, source of the call, line) of every `raise ValueError/KeyError/FileNotFoundError(...)`."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            exc = node.exc if isinstance(node, ast.Raise) else None
            if isinstance(exc, ast.Call):
                exc = exc.func
            if isinstance(exc, ast.Name) and exc.id in CHECKED:
                call = ast.unparse(node.exc)
                found.append((path.relative_to(PACKAGE).as_posix(), exc.id, call, node.lineno))
    return found


def test_plain_builtin_raises_are_all_listed_with_a_reason():
    found = plain_raises()
    unlisted = [f"stepdistill/{f}:{line}: {call[:100]}" for f, name, call, line in found
                if not any(f == af and name == an and frag in call for af, an, frag in ALLOWED)]
    assert not unlisted, ("raise a stepdistill.errors class (RecipeError, InputError, MissingFileError, ...) for a "
                          "problem the user can fix, or list the raise in ALLOWED with why it is a bug:\n"
                          + "\n".join(unlisted))
    stale = [key for key in ALLOWED if not any(f == key[0] and name == key[1] and key[2] in call
                                               for f, name, call, _ in found)]
    assert not stale, f"ALLOWED lists raises that are gone: {stale}"


def test_a_damaged_npz_is_a_user_error(tmp_path):
    from stepdistill.data.real import load_npz
    from stepdistill.eval.images import load_reference

    for content in (b"", b"not an npz", b"PK\x03\x04 truncated"):  # empty, text, a cut-off download
        bad = tmp_path / "bad.npz"
        bad.write_bytes(content)
        with pytest.raises(InputError, match=r"the reference statistics .*bad\.npz is not a readable \.npz file"):
            load_reference(bad)
        with pytest.raises(InputError, match=r"data\.path .*bad\.npz is not a readable \.npz file"):
            load_npz(bad, (2,), conditional=False)


def test_sampling_a_damaged_export_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("STEPDISTILL_DEBUG", raising=False)
    folder = tmp_path / "export"
    (folder / "unet").mkdir(parents=True)
    (folder / "scheduler").mkdir()
    (folder / "unet" / "config.json").write_text("{ not json")
    assert cli.main(["sample", "--export", str(folder), "--n", "1", "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "does not load as an exported diffusers folder" in err, err
