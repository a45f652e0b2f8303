"""The generator's start time (generator.start_t) and input noise (generator.start_noise): the K-step grid from
start_t, the first step's time and input scale in training, sampling and the warm start, and the recipe checks."""
import math

import pytest
import torch
from torch import nn

from stepdistill.diffusion.parametrization import Prediction
from stepdistill.diffusion.schedules import EDM, RectifiedFlow, VPDiscrete
from stepdistill.diffusion.timesteps import step_times
from stepdistill.models.generator import Generator
from stepdistill.models.multi_student import MultiStudent
from stepdistill.recipe import RecipeError, load_recipe

BETAS = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2  # SD's scaled_linear
VP = VPDiscrete(torch.cumprod(1 - BETAS, 0))


def test_k_step_grid_from_the_start_time_on_a_ddpm_teacher():
    """LCM's grid over the first round(start_t * 1000) timesteps: 1 -> 999 (unchanged), 0.4 -> DMD2's 399,
    0.626 -> SiD-LSG's t_init 625; K steps k = D // K apart."""
    taus = lambda k, s: [round(t * 999) for t in step_times(k, VP, s)]  # noqa: E731
    assert taus(4, 1.0) == [999, 749, 499, 249] and taus(1, 1.0) == [999] and taus(3, 1.0) == [998, 665, 332]
    assert taus(1, 0.4) == [399]
    assert taus(4, 0.4) == [399, 299, 199, 99]
    assert taus(2, 0.4) == [399, 199]
    assert taus(1, 0.626) == [625]
    assert step_times(4, VP, 1.0) == step_times(4, VP)  # the default is the old grid, bitwise


def test_k_step_grid_from_the_start_time_on_continuous_schedules():
    """SiD-DiT's t_i = t_init (1 - i/K)."""
    assert step_times(4, RectifiedFlow(), 0.5) == [0.5, 0.375, 0.25, 0.125]
    assert step_times(2, EDM(), 0.8) == [0.8, 0.4]
    assert step_times(4, RectifiedFlow(), 1.0) == [1.0, 0.75, 0.5, 0.25]


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_step_times_refuse_a_start_outside_0_1(bad):
    with pytest.raises(ValueError, match="start_t"):
        step_times(1, VP, bad)


def test_a_ddpm_grid_too_short_for_k_steps_names_the_key():
    with pytest.raises(ValueError, match="generator.start_t"):
        step_times(4, VP, 0.003)  # the first 3 timesteps cannot hold 4 steps


class Recorder(nn.Module):
    """A stand-in network: records each call's (x_t, t) and predicts x0 = 0."""

    def __init__(self, schedule):
        super().__init__()
        self.schedule, self.calls = schedule, []
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, cond=None):
        self.calls.append((x.clone(), t.clone()))
        alpha, sigma = self.schedule.alpha_sigma(t)
        x0 = torch.zeros_like(x) + self.w
        return Prediction(x0, (x - alpha.reshape(-1, 1) * x0) / sigma.reshape(-1, 1))


@pytest.mark.parametrize("schedule,start_t,noise,scale,t0", [
    (VP, 1.0, "pure", 1.0, 1.0),  # the old behaviour
    (VP, 0.4, "pure", 1.0, 399 / 999),  # DMD2 SDXL: unit noise, network at 399
    # SiD-LSG: add_noise(0, z, 625) = sqrt(1 - alphabar_625) z
    (VP, 0.626, "schedule", math.sqrt(1 - float(torch.prod(1 - BETAS[:626]))), 625 / 999),
    (EDM(), 1.0, "pure", 80.0, 1.0),
    (EDM(), float(EDM().t_of_logsnr(torch.tensor(-2 * math.log(2.5)))), "schedule", 2.5, None),  # SiD: 2.5 z at 2.5
    (RectifiedFlow(), 0.5, "schedule", 0.5, 0.5),
])
def test_first_step_runs_at_the_start_time_on_input_of_the_right_scale(schedule, start_t, noise, scale, t0):
    net = Recorder(schedule)
    gen = Generator(net, 2, start_t=start_t, start_noise=noise)
    z = torch.randn(5, 3)
    t0 = start_t if t0 is None else t0
    gen(z, noise=lambda: torch.zeros(5, 3))  # sampling
    x, t = net.calls[0]
    torch.testing.assert_close(x, z * scale, rtol=1e-5, atol=0)
    torch.testing.assert_close(t.double(), torch.full((5,), t0, dtype=torch.float64), rtol=0, atol=1e-6)
    net.calls.clear()  # training: terms.sample_generator's k = 0 path and backward simulation
    gen.step(gen.prior(z), 0)
    torch.testing.assert_close(net.calls[0][0], z * scale, rtol=1e-5, atol=0)
    assert float(net.calls[0][1][0]) == pytest.approx(t0, abs=1e-6)
    net.calls.clear()
    gen.backward_simulate(z, None, 1)
    torch.testing.assert_close(net.calls[0][0], z * scale, rtol=1e-5, atol=0)
    assert [float(t[0]) for _, t in net.calls] == pytest.approx([gen.times[0]])


def test_sid_edm_start_is_sigma_2_5():
    t = float(EDM().t_of_logsnr(torch.tensor(-2 * math.log(2.5))))
    assert float(EDM().sigma(torch.tensor(t))) == pytest.approx(2.5, rel=1e-6)
    assert t == pytest.approx(0.49930, abs=1e-4)  # (2.5^(1/7) - 0.002^(1/7)) / (80^(1/7) - 0.002^(1/7))


def test_fewer_steps_than_trained_start_at_the_same_time():
    net = Recorder(VP)
    gen = Generator(net, 4, start_t=0.4, start_noise="schedule")
    gen(torch.randn(2, 3), steps=2, noise=lambda: torch.zeros(2, 3))
    assert [round(float(t[0]) * 999) for _, t in net.calls] == [399, 199]


def test_multi_student_starts_where_its_students_do():
    nets = [Recorder(VP), Recorder(VP)]
    multi = MultiStudent([Generator(n, 1, start_t=0.4, start_noise="schedule") for n in nets], num_classes=2)
    z = torch.randn(4, 3)
    multi(z, torch.tensor([0, 1, 0, 1]))
    scale = math.sqrt(1 - float(torch.prod(1 - BETAS[:400])))
    for k, n in enumerate(nets):
        torch.testing.assert_close(n.calls[0][0], z[k::2] * scale, rtol=1e-5, atol=0)
        assert round(float(n.calls[0][1][0]) * 999) == 399
    with pytest.raises(ValueError, match="same"):
        MultiStudent([Generator(Recorder(VP), 1, start_t=0.4), Generator(Recorder(VP), 1)], num_classes=2)
    with pytest.raises(ValueError, match="same"):
        MultiStudent([Generator(Recorder(VP), 1, start_t=0.4, start_noise="schedule"),
                      Generator(Recorder(VP), 1, start_t=0.4)], num_classes=2)


class ODETeacher:
    """teacher_pairs' view of a teacher whose network records its calls (predicts x0 = 0)."""

    def __init__(self, schedule):
        self.net = Recorder(schedule)
        self.shape = (3,)
        self.score = self

    @property
    def schedule(self):
        return self.net.schedule

    def parameters(self):
        return self.net.parameters()

    def buffers(self):
        return self.net.buffers()

    def sample_cond(self, n, classes=None):
        return None

    def guided(self, x, t, cond, scale):
        return self.net(x, t)


@pytest.mark.parametrize("start_t,noise,t0", [(1.0, "pure", 1.0), (0.4, "pure", 1.0), (0.4, "schedule", 399 / 999)])
def test_warm_start_pairs_start_from_the_generators_input(start_t, noise, t0):
    """'schedule': the teacher ODE starts at the start time from the generator's own input; 'pure' (DMD2's 399):
    the ODE starts at t = 1 from the same unit noise the generator is given (DMD2's SDXL ODE pairs)."""
    from stepdistill.training.warm_start import teacher_pairs

    teacher = ODETeacher(VP)
    gen = Generator(Recorder(VP), 1, start_t=start_t, start_noise=noise)
    torch.manual_seed(0)
    z, _, _ = teacher_pairs(teacher, 6, 4, generator=gen)
    x, t = teacher.net.calls[0]
    torch.testing.assert_close(x, gen.prior(z))
    assert float(t[0]) == pytest.approx(t0, abs=1e-6)
    assert all(float(t[0]) <= t0 + 1e-6 for _, t in teacher.net.calls)


def recipe(*overrides):
    return load_recipe(None, list(overrides), data={"teacher": {"name": "gmm"}, "objective": {"name": "vsd"}})


def test_recipe_keys_default_to_the_old_start_and_are_checked():
    r = recipe()
    assert (r.generator.start_t, r.generator.start_noise) == (1.0, "pure")
    r = recipe("generator.start_t=0.4", "generator.start_noise=schedule")
    assert (r.generator.start_t, r.generator.start_noise) == (0.4, "schedule")
    for bad in ("0", "-0.5", "1.2"):
        with pytest.raises(RecipeError, match=r"generator.start_t must be in \(0, 1\]"):
            recipe(f"generator.start_t={bad}")
    with pytest.raises(RecipeError, match="generator.start_noise"):
        recipe("generator.start_noise=unit")


def test_a_trained_run_records_the_start_and_reloads_it(tmp_path):
    from stepdistill.run import load_run
    from stepdistill.training.trainer import Trainer

    r = load_recipe("configs/toy/gmm_vsd.yaml", ["teacher.hidden=16", "train.iterations=1", "eval.at_end=false",
                                                 "train.batch_size=8", "generator.start_t=0.5",
                                                 "generator.start_noise=schedule"])
    t = Trainer(r, tmp_path / "run", quiet=True)
    assert t.nets.generator.times == [0.5] and t.nets.generator.start_noise == "schedule"
    t.run()
    run = load_run(tmp_path / "run")
    assert run.student.times == [0.5] and run.student.start_noise == "schedule"
    # a run recorded before these keys existed loads with the old start
    text = (tmp_path / "run" / "recipe.yaml").read_text()
    lines = [ln for ln in text.splitlines() if "start_t" not in ln and "start_noise" not in ln]
    assert len(lines) == len(text.splitlines()) - 2
    (tmp_path / "run" / "recipe.yaml").write_text("\n".join(lines) + "\n")
    assert load_run(tmp_path / "run").student.times == [1.0]
