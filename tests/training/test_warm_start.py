"""DMD2's optional regression warm start on teacher ODE pairs."""
import pytest
import torch
from safetensors.torch import load_file

from stepdistill.eval.metrics import energy_distance
from stepdistill.recipe import load_recipe
from stepdistill.training.trainer import Trainer
from stepdistill.training.warm_start import regression_warm_start, teacher_pairs


def test_warm_start_moves_the_generator_onto_the_teachers_ode_map(gmm_built):
    b = gmm_built()
    torch.manual_seed(0)
    z, _, target = teacher_pairs(b.teacher, 512, 16)
    gen = b.nets.generator
    before = float((gen(z).detach() - target).pow(2).mean())
    torch.manual_seed(1)
    last, done = regression_warm_start(gen, teacher_pairs(b.teacher, 512, 16, generator=gen), 3e-3, 300, 256,
                                       quiet=True)
    assert done == 300
    after = float((gen(z).detach() - target).pow(2).mean())
    assert after < 0.25 * before and last < 0.25 * before
    ref = b.teacher.sample(2048, torch.Generator().manual_seed(0))
    assert energy_distance(gen(torch.randn(2048, 2)).detach(), ref) < energy_distance(torch.zeros(2048, 2), ref)


def test_odd_pair_nfe_runs_heun_as_the_evaluation_does(gmm_built):
    """generator.warm_start_nfe reads like eval.teacher_nfe: 7 evaluations are Heun over 4 steps, 8 are Euler."""
    from stepdistill.diffusion.solvers import sample_ode

    b = gmm_built()
    score = b.teacher.score
    for nfe, steps, heun in ((7, 4, True), (8, 8, False)):
        torch.manual_seed(0)
        z, _, x0 = teacher_pairs(b.teacher, 64, nfe)
        with torch.no_grad():
            ref, _ = sample_ode(lambda x, t: score.guided(x, t, None, 1.0), z * score.schedule.init_sigma,
                                score.schedule, steps, heun=heun)
        assert torch.equal(x0, ref)


def test_trainer_warm_starts_once_and_checkpoints_it(tmp_path):
    r = load_recipe("configs/toy/gmm_vsd.yaml", ["teacher.hidden=32", "train.iterations=2", "train.checkpoint_every=0",
                                                 "generator.warm_start_iterations=20", "generator.warm_start_pairs=64",
                                                 "eval.at_end=false", "train.batch_size=32"])
    t = Trainer(r, tmp_path / "run", quiet=True)
    t.run()
    assert "loss/warm_start" in t.last_logs
    assert (tmp_path / "run" / "checkpoints").exists()
    t2 = Trainer(r, tmp_path / "run", quiet=True)  # a rerun resumes from the checkpoint and does not redo it
    calls = []
    import stepdistill.training.warm_start as ws
    original = ws.regression_warm_start
    ws.regression_warm_start = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        t2.run()
    finally:
        ws.regression_warm_start = original
    assert calls == []


def test_pairs_follow_the_objectives_guided_teacher(gmm_built, tmp_path, monkeypatch):
    """The warm start regresses onto the teacher the objective distils: its ODE with objective.guidance_scale."""
    b = gmm_built("teacher.conditional=true")
    pairs = {}
    for scale in (1.0, 3.0):
        torch.manual_seed(0)
        pairs[scale] = teacher_pairs(b.teacher, 64, 8, guidance_scale=scale)
    assert torch.equal(pairs[1.0][0], pairs[3.0][0]) and torch.equal(pairs[1.0][1], pairs[3.0][1])  # same z, labels
    assert not torch.allclose(pairs[1.0][2], pairs[3.0][2])
    import stepdistill.training.warm_start as ws
    seen = []
    made = ws.teacher_pairs
    monkeypatch.setattr(ws, "teacher_pairs", lambda *a, **k: seen.append(k["guidance_scale"]) or made(*a, **k))
    r = load_recipe("configs/toy/gmm_vsd.yaml", ["teacher.hidden=32", "teacher.conditional=true", "train.iterations=1",
                                                 "objective.guidance_scale=2.5", "generator.warm_start_iterations=5",
                                                 "eval.at_end=false", "train.batch_size=16"])
    Trainer(r, tmp_path / "run", quiet=True).run()
    assert seen == [2.5]


def test_the_regression_term_keeps_the_generator_on_the_teachers_ode_map(tmp_path):
    """DMD's regression loss (objective.regression_weight) trains on the pairs the loop made without warm-start
    iterations: the generator ends closer to them than the same run without the term."""
    errors = {}
    for weight in (0.0, 20.0):
        r = load_recipe("configs/toy/gmm_vsd.yaml", ["teacher.hidden=32", "train.iterations=120", "eval.at_end=false",
                                                     "train.batch_size=64", "train.checkpoint_every=0",
                                                     f"objective.regression_weight={weight}",
                                                     "objective.update_ratio=1", "generator.warm_start_pairs=256"])
        t = Trainer(r, tmp_path / str(weight), quiet=True)
        t.run()
        if weight:
            assert "loss/regression" in t.last_logs and "loss/warm_start" not in t.last_logs
            z, cond, target = t.objective.pairs
        else:
            assert t.objective.pairs is None
        errors[weight] = t
    gens = {w: t.nets.generator for w, t in errors.items()}
    with torch.no_grad():
        mse = {w: float((g.step(g.prior(z), 0, cond) - target).pow(2).mean()) for w, g in gens.items()}
    assert mse[20.0] < 0.5 * mse[0.0], mse


def _pairs(b, **kw):
    torch.manual_seed(0)
    out = teacher_pairs(b.teacher, 64, 8, cache=True, **kw)
    return out, torch.rand(1)  # what the random stream gives next


def test_cached_pairs_come_back_bit_for_bit_without_the_teacher_and_leave_the_random_stream_as_it_was(
        gmm_built, tmp_path, monkeypatch):
    monkeypatch.setenv("STEPDISTILL_CACHE", str(tmp_path))
    b = gmm_built("teacher.conditional=true")
    made, after_made = _pairs(b)
    assert len(list((tmp_path / "pairs").glob("*.safetensors"))) == 1
    import stepdistill.training.warm_start as ws
    monkeypatch.setattr(ws, "sample_ode", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ODE run again")))
    read, after_read = _pairs(b)
    assert all(torch.equal(m, r) for m, r in zip(made, read)) and torch.equal(after_made, after_read)


def test_the_pairs_cache_misses_when_what_the_pairs_depend_on_changes(gmm_built, tmp_path, monkeypatch):
    monkeypatch.setenv("STEPDISTILL_CACHE", str(tmp_path))
    b = gmm_built("teacher.conditional=true")
    base, _ = _pairs(b)
    _pairs(b, guidance_scale=2.0)
    torch.manual_seed(0)
    teacher_pairs(b.teacher, 64, 4, cache=True)  # fewer steps
    torch.manual_seed(1)
    teacher_pairs(b.teacher, 64, 8, cache=True)  # other noise
    with torch.no_grad():
        next(b.teacher.score.buffers()).view(-1)[0] += 1e-3  # other teacher weights (a mixture's means)
    changed, _ = _pairs(b)
    assert len(list((tmp_path / "pairs").glob("*.safetensors"))) == 5
    assert not torch.equal(base[2], changed[2])


def test_a_corrupt_or_unwritable_pairs_cache_costs_only_the_cache(gmm_built, tmp_path, monkeypatch):
    monkeypatch.setenv("STEPDISTILL_CACHE", str(tmp_path))
    b = gmm_built()
    made, _ = _pairs(b)
    (cached,) = (tmp_path / "pairs").glob("*.safetensors")
    cached.write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="unreadable teacher-pairs cache"):
        again, _ = _pairs(b)
    assert torch.equal(made[2], again[2]) and len(load_file(cached)["x0"]) == 64  # recomputed and rewritten
    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setenv("STEPDISTILL_CACHE", str(blocked))  # its pairs/ folder cannot be made
    with pytest.warns(UserWarning, match="could not cache the teacher pairs"):
        third, _ = _pairs(b)
    assert torch.equal(made[2], third[2])


def test_warm_start_cosine_decay_takes_the_rate_from_its_value_to_near_zero(gmm_built, monkeypatch):
    b = gmm_built()
    torch.manual_seed(0)
    pairs = teacher_pairs(b.teacher, 64, 4)
    rates, step = {}, torch.optim.Adam.step
    for decay in ("none", "cosine"):
        seen = rates[decay] = []
        monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, s=seen, **k: s.append(
            self.param_groups[0]["lr"]) or step(self, *a, **k))
        regression_warm_start(b.nets.generator, pairs, 1e-3, 50, 16, quiet=True, decay=decay)
        monkeypatch.undo()
    assert rates["none"] == [1e-3] * 50
    cos = rates["cosine"]
    assert cos[0] == 1e-3 and all(a > b for a, b in zip(cos, cos[1:])) and cos[-1] < 1e-5
    assert cos[25] == pytest.approx(5e-4)


def test_a_budgeted_warm_start_fits_its_iterations_and_its_decay_to_the_seconds_left(gmm_built, monkeypatch):
    """With `seconds` the count is set, every PROBE iterations, to what fits at the last PROBE's rate (at a steady
    rate the cosine decay still ends near 0; when the machine slows down, the next check cuts it again; when it speeds
    up, the count grows back, never past the planned one); no seconds left: no iterations; no budget: all of them (the
    first test)."""
    import stepdistill.training.warm_start as ws

    b = gmm_built()
    torch.manual_seed(0)
    pairs = teacher_pairs(b.teacher, 64, 4)
    clock, rates, cost, slow, step = [0.0], [], [0.1, 0.1], [100], torch.optim.Adam.step

    def timed_step(self, *a, **k):  # each iteration costs `cost` of a fake clock: the first `slow`, then the others
        rates.append(self.param_groups[0]["lr"])
        clock[0] += cost[len(rates) > slow[0]]
        return step(self, *a, **k)

    monkeypatch.setattr(ws.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(torch.optim.Adam, "step", timed_step)
    _, done = regression_warm_start(b.nets.generator, pairs, 1e-3, 1000, 16, quiet=True, decay="cosine", seconds=20)
    assert done == 200 == len(rates)  # 50 in 5 s, then the 150 that fit in the 15 s left
    assert rates[0] == 1e-3 and rates[-1] < 1e-6
    clock[0], cost[1] = 0.0, 0.2  # twice as slow after 100 iterations: 100 + 50 fill the 20 s (one plan: 200, 30 s)
    rates.clear()
    _, done = regression_warm_start(b.nets.generator, pairs, 1e-3, 1000, 16, quiet=True, seconds=20)
    assert (done, clock[0]) == (150, pytest.approx(20)), (done, clock[0], len(rates))
    clock[0], cost[:], slow[0] = 0.0, [0.2, 0.1], 50  # a slow start: 50 in 10 s plan 100, then 100 more fill 10 s
    rates.clear()
    _, done = regression_warm_start(b.nets.generator, pairs, 1e-3, 1000, 16, quiet=True, seconds=20)
    assert (done, clock[0]) == (150, pytest.approx(20)), (done, clock[0], len(rates))
    clock[0] = 0.0
    _, done = regression_warm_start(b.nets.generator, pairs, 1e-3, 120, 16, quiet=True, seconds=20)
    assert done == 120  # never past the planned count
    _, done = regression_warm_start(b.nets.generator, pairs, 1e-3, 1000, 16, quiet=True, seconds=-3)
    assert done == 0


def test_generator_warm_start_share_gives_the_warm_start_its_share_of_train_max_minutes(tmp_path):
    """The loop passes share x budget less the seconds spent (here the pairs took more than 60 microseconds x 0.5): no
    iterations, recorded in the run's logs; without a share all of them run."""
    base = ["teacher.hidden=32", "train.iterations=1", "train.checkpoint_every=0", "eval.at_end=false",
            "generator.warm_start_iterations=20", "generator.warm_start_pairs=64", "train.batch_size=32",
            "train.max_minutes=1e-6"]
    done = {}
    for share in (0.0, 0.5):
        r = load_recipe("configs/toy/gmm_vsd.yaml", [*base, f"generator.warm_start_share={share}"])
        t = Trainer(r, tmp_path / f"run_{share}", quiet=True)
        t.run()
        done[share] = t.last_logs["warm_start/iterations"]
    assert done == {0.0: 20, 0.5: 0}
