"""tbn_compiler.qat: the loss, schedule and BatchNorm recalibration against numpy, and a
short fine-tuning run that must recover a tiled model's accuracy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tbn_compiler as tbn
from tbn_compiler import qat


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _distill_reference(student, teacher, labels, temperature, alpha) -> float:
    """The distillation formula written out in float64 numpy."""
    s, t = student.astype(np.float64), teacher.astype(np.float64)
    ce = -_log_softmax(s)[np.arange(len(labels)), labels].mean()
    log_q, log_p = _log_softmax(s / temperature), _log_softmax(t / temperature)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=1).mean()
    return (1 - alpha) * ce + alpha * temperature**2 * kl


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (4.0, 0.9), (2.5, 0.0), (3.0, 1.0)])
def test_distill_loss_matches_the_formula(temperature, alpha):
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(7, 5, generator=gen) * 3
    teacher = torch.randn(7, 5, generator=gen) * 3
    labels = torch.randint(0, 5, (7,), generator=gen)
    got = qat.distill_loss(student, teacher, labels, temperature, alpha)
    want = _distill_reference(student.numpy(), teacher.numpy(), labels.numpy(), temperature, alpha)
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_distill_loss_gradient_reaches_the_student_only():
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(4, 3, generator=gen, requires_grad=True)
    teacher = torch.randn(4, 3, generator=gen, requires_grad=True)
    labels = torch.tensor([0, 2, 1, 1])
    qat.distill_loss(student, teacher, labels, 2.0, 1.0).backward()
    # d/ds of T^2 KL(p || softmax(s/T)), batch-mean: T * (softmax(s/T) - p) / batch
    s, t = student.detach().numpy() / 2.0, teacher.detach().numpy() / 2.0
    want = 2.0 * (np.exp(_log_softmax(s)) - np.exp(_log_softmax(t))) / 4
    np.testing.assert_allclose(student.grad.numpy(), want, rtol=1e-5, atol=1e-7)
    assert teacher.grad is None


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"alpha": 1.5}, "alpha must be in"),
        ({"teacher_logits": torch.zeros(3, 4)}, "same \\(batch, classes\\) shape"),
    ],
)
def test_distill_loss_rejects_bad_arguments(kwargs, message):
    args = {"student_logits": torch.zeros(3, 5), "teacher_logits": torch.zeros(3, 5)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        qat.distill_loss(labels=torch.zeros(3, dtype=torch.long), **args)


def test_warmup_cosine_follows_the_formula():
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.2)
    schedule = qat.warmup_cosine(opt, total_steps=10, warmup_steps=3)
    got = []
    for _ in range(10):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    want = [0.2 * (s + 1) / 3 for s in range(3)]
    want += [0.2 * 0.5 * (1 + math.cos(math.pi * (s - 3) / 7)) for s in range(3, 10)]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_recalibrate_batchnorm_averages_the_batch_statistics():
    gen = torch.Generator().manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    batches = [(torch.randn(8, 3, generator=gen) * 2 + 1, torch.zeros(8)) for _ in range(3)]
    weight_before = model[0].weight.detach().clone()
    assert qat.recalibrate_batchnorm(model, batches) == 1
    with torch.no_grad():
        pre = [model[0](x).numpy().astype(np.float64) for x, _ in batches]
    # momentum=None: the running values are the plain means of the per-batch statistics
    np.testing.assert_allclose(
        model[1].running_mean.numpy(), np.mean([b.mean(0) for b in pre], 0), rtol=1e-5
    )
    np.testing.assert_allclose(
        model[1].running_var.numpy(), np.mean([b.var(0, ddof=1) for b in pre], 0), rtol=1e-5
    )
    assert model[1].momentum == 0.1 and not model.training
    assert torch.equal(model[0].weight, weight_before)


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four Gaussian classes in 16 dimensions around fixed centres."""
    centres = torch.randn(4, 16, generator=torch.Generator().manual_seed(123)) * 1.5
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=gen)
    return centres[labels] + torch.randn(n, 16, generator=gen), labels


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
        nn.Linear(64, 4),
    )  # fmt: skip


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model.eval()(x).argmax(1) == y).float().mean().item()


def _loader(x, y, seed: int):
    dataset = torch.utils.data.TensorDataset(x, y)
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=32, shuffle=True, generator=gen)


@pytest.fixture(scope="module")
def teacher_and_data():
    torch.manual_seed(0)
    x, y = _blobs(512, seed=1)
    x_test, y_test = _blobs(512, seed=2)
    teacher = _mlp()
    qat.fit(teacher, _loader(x, y, 0), epochs=8, lr=1e-2, progress=False)
    return teacher, x, y, x_test, y_test


def test_fit_recovers_the_accuracy_lost_to_tiling(teacher_and_data):
    teacher, x, y, x_test, y_test = teacher_and_data
    assert _accuracy(teacher, x_test, y_test) > 0.95
    cfg = tbn.TBNConfig(p=4, min_numel=1000)
    student = tbn.prepare(teacher, cfg)
    before = _accuracy(student, x_test, y_test)
    history = qat.fit(student, _loader(x, y, 1), teacher=teacher, epochs=8, progress=False)
    after = _accuracy(student, x_test, y_test)
    assert history[-1] < history[0]
    assert after > before + 0.1 and after > _accuracy(teacher, x_test, y_test) - 0.03
    assert not student.training


def test_fit_is_reproducible(teacher_and_data):
    teacher, x, y, _, _ = teacher_and_data
    cfg = tbn.TBNConfig(p=2, min_numel=1000)
    runs = []
    for _ in range(2):
        student = tbn.prepare(teacher, cfg)
        qat.fit(student, _loader(x, y, 3), teacher=teacher, epochs=2, progress=False)
        runs.append(student.state_dict())
    for key, value in runs[0].items():
        assert torch.equal(value, runs[1][key]), key


def test_fit_rejects_alpha_without_teacher_and_unsized_loaders():
    model = _mlp()
    x, y = _blobs(16, seed=0)
    with pytest.raises(ValueError, match="no teacher"):
        qat.fit(model, [(x, y)], alpha=0.5, epochs=1, progress=False)
    with pytest.raises(TypeError, match="needs a loader with a len"):
        qat.fit(model, iter([(x, y)]), epochs=1, progress=False)


def test_fit_without_teacher_minimises_cross_entropy():
    torch.manual_seed(0)
    x, y = _blobs(256, seed=4)
    model = _mlp()
    before = F.cross_entropy(model.eval()(x), y).item()
    qat.fit(model, _loader(x, y, 0), epochs=3, lr=1e-2, recalibrate=False, progress=False)
    with torch.no_grad():
        assert F.cross_entropy(model(x), y).item() < 0.5 * before
