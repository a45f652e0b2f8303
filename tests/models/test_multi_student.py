"""MSD routing: the partition rule and the MultiStudent that applies it at sampling time."""
import pytest
import torch

from stepdistill.models.generator import Generator
from stepdistill.models.multi_student import MultiStudent, describe, partition, student_of
from stepdistill.teachers.gmm import GMMConfig, GMMTeacher


@pytest.mark.parametrize("num_classes", [1, 2, 3, 4, 7, 10, 1000])
def test_every_class_goes_to_exactly_one_student_and_no_student_is_empty(num_classes):
    for k in sorted({1, 2, 3, 4, num_classes // 2 or 1, num_classes - 1 or 1, num_classes}):
        if k > num_classes:
            continue
        groups = partition(num_classes, k)
        assert len(groups) == k and all(groups), (num_classes, k)
        assert sorted(c for g in groups for c in g) == list(range(num_classes))  # each class exactly once
        assert all(g == list(range(g[0], g[-1] + 1)) for g in groups)  # contiguous blocks, in order
        sizes = [len(g) for g in groups]
        assert max(sizes) - min(sizes) <= 1
        owner = student_of(torch.arange(num_classes), k, num_classes)
        assert all(int(owner[c]) == i for i, g in enumerate(groups) for c in g)


def test_the_rule_on_ten_classes():
    assert partition(10, 4) == [[0, 1, 2], [3, 4], [5, 6, 7], [8, 9]]
    assert [describe(g) for g in partition(10, 4)] == ["classes 0-2", "classes 3-4", "classes 5-7", "classes 8-9"]
    assert describe([3]) == "class 3"


def _students(teacher, k, steps=1):
    gens = []
    for i in range(k):
        g = Generator(teacher.student_network(), steps)
        with torch.no_grad():  # distinct students: perturb each one's zero-initialised output layer
            g.net.net.net[-1].bias.fill_(0.5 * (i + 1))
        gens.append(g)
    return gens


@pytest.mark.parametrize("steps", [1, 2])
def test_multi_student_sends_each_sample_to_its_student(steps):
    teacher = GMMTeacher(GMMConfig(conditional=True, hidden=16))
    gens = _students(teacher, 2, steps)
    multi = MultiStudent(gens, teacher.num_classes)
    assert multi.steps == steps and multi.times == gens[0].times and multi.schedule is gens[0].schedule
    z, cond = torch.randn(12, 2), torch.arange(12) % 4
    fixed = torch.randn(12, 2)
    with torch.no_grad():
        out = multi(z, cond, noise=lambda: fixed)
        for k, classes in enumerate(multi.classes()):
            rows = torch.isin(cond, torch.tensor(classes))
            alone = gens[k](z[rows], cond[rows], noise=lambda rows=rows: fixed[rows])
            torch.testing.assert_close(out[rows], alone)
        assert not torch.allclose(gens[0](z, cond), gens[1](z, cond))  # so the check above is not vacuous


def test_multi_student_needs_labels_it_can_route():
    teacher = GMMTeacher(GMMConfig(conditional=True, hidden=16))
    multi = MultiStudent(_students(teacher, 2), teacher.num_classes)
    with pytest.raises(ValueError, match="routes each sample by its class label"):
        multi(torch.randn(3, 2), None)
    with pytest.raises(ValueError, match=r"null \(unconditional\) label has no student"):
        multi(torch.randn(3, 2), torch.tensor([0, 1, 4]))
