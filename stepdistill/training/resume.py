"""Resume rules: who may hold a run folder, which recipe changes a rerun may make, which checkpoint it resumes from,
and how a resumed run's logs are cut back to that checkpoint, so that rerunning the same command continues exactly as
an uninterrupted run would."""
from __future__ import annotations

import json
import warnings
from contextlib import ExitStack, contextmanager
from pathlib import Path

from .. import parallel
from .. import recipe as recipe_mod
from ..errors import InputError
from ..recipe import Recipe, RecipeError
from .state import RunFolderError, list_checkpoints, load_latest, run_lock


@contextmanager
def locked(outdir: Path):
    """Hold a run folder (state.run_lock, taken by process 0) for a block; every process fails when it is held."""
    stack, error = ExitStack(), None
    if parallel.is_main():
        try:
            stack.enter_context(run_lock(outdir))
        except RunFolderError as e:
            error = e
    if not parallel.all_true(error is None):
        raise error or RunFolderError(f"{outdir} cannot be held (see process 0's error)")
    with stack:
        yield


# keys a resumed run may change: the budget, how networks execute (same maths within bf16 tolerance), how often it
# logs, samples and checkpoints, and the final evaluation (not the curve's protocol: its points must compare)
RESUME_MAY_CHANGE = {("train", k) for k in ("iterations", "max_minutes", "attention", "compile",
                                               "gradient_checkpointing", "fsdp", "log_every", "log_with",
                                               "sample_every", "checkpoint_every", "keep_checkpoints", "on_collapse",
                                               "max_rollbacks")} | \
    {("eval", k) for k in ("n", "seed", "teacher_nfe", "guidance_scale", "batch_size", "at_end", "metrics",
                           "fid_backend", "inception", "reference", "kid_subset_size")}


def check_resumable(outdir: Path, recipe: Recipe) -> None:
    """A rerun must use the same recipe as the run it resumes (budget and execution keys may change)."""
    saved_path = outdir / "recipe.yaml"
    if not saved_path.exists() or not any(list_checkpoints(c) for c in outdir.rglob("checkpoints")):
        return  # nothing to resume (a run that failed before its first checkpoint): this recipe starts afresh
    saved = recipe_mod.to_dict(recipe_mod.load_recipe(saved_path))
    new = recipe_mod.to_dict(recipe)
    diffs = [f"{k}: {saved.get(k)!r} -> {new[k]!r}" for k in new
             if not isinstance(new[k], dict) and new[k] != saved.get(k)]  # top-level keys (plugins)
    for section in (k for k in new if isinstance(new[k], dict)):
        for key in set(new[section]) | set(saved.get(section, {})):
            if (section, key) in RESUME_MAY_CHANGE:
                continue
            if new[section].get(key) != saved.get(section, {}).get(key):
                diffs.append(f"{section}.{key}: {saved.get(section, {}).get(key)!r} -> {new[section].get(key)!r}")
    if diffs:
        raise RecipeError(f"{outdir} holds a run with a different recipe ({'; '.join(diffs)}). Rerun with the same "
                          "recipe to resume (train.iterations, train.max_minutes, eval.* and how often it logs may "
                          "change; `stepdistill eval --run` re-scores), or choose another --outdir.")
    was, now, decay = saved["train"]["iterations"], new["train"]["iterations"], new["train"]["lr_decay"]
    if now != was and decay != "none":
        warnings.warn(f"{outdir}: train.iterations {was} -> {now} with train.lr_decay={decay}: from the resumed "
                      f"iteration on, the learning rate decays towards iteration {now}, so the run will not equal "
                      f"one started with train.iterations={now}", stacklevel=2)


def truncate_stats(path: Path, step: int) -> int:
    """Drop log lines past the resumed iteration, so a resumed run's stats.jsonl reads like an uninterrupted one's;
    returns how many were dropped. A torn last line (a write cut short by a crash or a full disk) is dropped with a
    warning; a bad line elsewhere is an error naming it."""
    if not path.exists():
        return 0
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    keep = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            if i < len(lines) - 1:
                raise InputError(f"{path}, line {i + 1}, is not a JSON record: repair or delete that line, "
                                 "then rerun") from None
            warnings.warn(f"{path}: dropping its torn last line (a write cut short): {line[:60]!r}", stacklevel=2)
            continue
        if record["step"] <= step:
            keep.append(line)
    path.write_text("".join(line + "\n" for line in keep))
    return len(lines) - len(keep)


def newest_checkpoint(outdir: Path) -> tuple[int, dict, dict] | None:
    """(step, weights, state) of the newest intact checkpoint in outdir/checkpoints (damaged ones are skipped with a
    warning), or None: the run starts afresh. When every checkpoint is damaged, a RecipeError: starting over would
    overwrite them and the run's logs, so refuse and lose nothing."""
    found = load_latest(outdir / "checkpoints")
    if found is None:
        saved = list_checkpoints(outdir / "checkpoints")
        if saved:
            raise RecipeError(f"all {len(saved)} checkpoints in {outdir / 'checkpoints'} are damaged (see the "
                              "warnings above); move them away to start the run over, or choose another --outdir")
    return found
