"""A fine-tuning recipe for models made by :func:`tbn_compiler.prepare`.

Measured on the digits CNN of ``examples/demo.py`` (numbers in the README, "QAT recipe"):

1. ``qat = prepare(float_model, cfg)``: ``scores`` and ``weight`` of every tiled layer
   start from the float weights (the paper's initialisation).
2. ``fit(qat, loader, teacher=float_model)``: Adam, a per-step cosine learning-rate
   decay (optionally after a linear warm-up), and the loss :func:`distill_loss`: cross
   entropy on the labels mixed with the KL divergence to the float model's softened
   logits (knowledge distillation).
3. BatchNorm running statistics are then re-estimated with the final tiles
   (:func:`recalibrate_batchnorm`): during QAT the tiles keep flipping, so the running
   averages lag behind the weights the model ends with.

The largest single gain on the demo was architectural, not in this module: a BatchNorm
after every tiled layer (the demo adds one after ``fc1``). The ``p`` copies of an aligned
tile are the same rows scaled by ``alpha_i``; a per-channel affine after them is what
makes the copies differ.

Only torch is used here (no TVM); any model, loader and loss outside this module work
as well, since a prepared model is an ordinary ``nn.Module``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = ["distill_loss", "fit", "recalibrate_batchnorm", "warmup_cosine"]

Batch = Sequence[torch.Tensor]
"""One training batch: ``(*inputs, labels)``; the model is called as ``model(*inputs)``."""


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 4.0,
    alpha: float = 0.5,
) -> torch.Tensor:
    """Knowledge-distillation loss (Hinton et al.), averaged over the batch:

    ``(1 - alpha) * CE(student, labels)
    + alpha * T**2 * KL(softmax(teacher / T) || softmax(student / T))``.

    Logits are ``(batch, classes)``; ``labels`` are class indices ``(batch,)``. The
    ``T**2`` factor keeps the soft term's gradient scale independent of ``T``. No
    gradient flows into ``teacher_logits``.
    """
    _check_distill_args(student_logits, teacher_logits, temperature, alpha)
    hard = F.cross_entropy(student_logits, labels)
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.log_softmax(teacher_logits.detach() / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return (1.0 - alpha) * hard + alpha * temperature**2 * soft


def _check_distill_args(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, alpha: float
) -> None:
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(
            "distill_loss expects student and teacher logits of the same (batch, classes) "
            f"shape, got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"distill_loss temperature must be > 0, got {temperature!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"distill_loss alpha must be in [0, 1], got {alpha!r}")


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: the learning rate rises linearly over ``warmup_steps`` to the
    optimizer's, then follows half a cosine down to 0 at ``total_steps``."""
    if total_steps < 1 or not 0 <= warmup_steps < total_steps:
        raise ValueError(
            f"warmup_cosine needs total_steps >= 1 and 0 <= warmup_steps < total_steps, got "
            f"total_steps={total_steps}, warmup_steps={warmup_steps}"
        )

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / (total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Batch]) -> int:
    """Re-estimate the running mean/variance of every BatchNorm layer of ``model`` (that
    tracks running statistics) as the plain average over ``batches`` (labels ignored),
    without changing any parameter. ``model`` is left in eval mode. Returns the number of
    BatchNorm layers recalibrated (0: nothing to do)."""
    norms = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches seen
    model.train()
    try:
        with torch.no_grad():
            for *inputs, _labels in batches:
                model(*inputs)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.eval()
    return len(norms)


def fit(
    model: nn.Module,
    loader: Iterable[Batch],
    *,
    teacher: nn.Module | None = None,
    epochs: int = 15,
    lr: float = 3e-3,
    warmup_epochs: int = 0,
    temperature: float = 4.0,
    alpha: float | None = None,
    recalibrate: bool = True,
    progress: bool = True,
) -> list[float]:
    """Fine-tune ``model`` (typically ``prepare(float_model, cfg)``) in place with the
    recipe of this module; returns the mean training loss of each epoch and leaves
    ``model`` in eval mode.

    ``loader`` yields ``(*inputs, labels)`` batches, is iterated once per epoch and must
    have a ``len`` (a ``torch.utils.data.DataLoader`` does); shuffle it with a seeded
    generator for reproducible runs. With a ``teacher`` (the float model, run in eval
    mode, never updated) the loss is :func:`distill_loss` with ``alpha`` (default 0.5);
    without one it is cross entropy and ``alpha`` must stay unset. Adam at ``lr``,
    scheduled by :func:`warmup_cosine` per step. ``recalibrate``: finish with
    :func:`recalibrate_batchnorm` over one pass of ``loader``.
    """
    alpha = _distill_alpha(teacher, alpha)
    steps_per_epoch = _batches_per_epoch(loader)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("fit: the model has no trainable parameters")
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = warmup_cosine(optimizer, epochs * steps_per_epoch, warmup_epochs * steps_per_epoch)
    if teacher is not None:
        teacher.eval()
    history = []
    bar = tqdm(range(epochs), desc="QAT", unit="epoch", disable=not progress)
    for _ in bar:
        history.append(
            _train_epoch(model, loader, optimizer, schedule, teacher, temperature, alpha)
        )
        bar.set_postfix(loss=f"{history[-1]:.4f}")
    if recalibrate:
        recalibrate_batchnorm(model, loader)
    model.eval()
    return history


def _distill_alpha(teacher: nn.Module | None, alpha: float | None) -> float:
    if teacher is None:
        if alpha:
            raise ValueError(f"fit: alpha={alpha} weights a distillation term, but no teacher")
        return 0.0
    return 0.5 if alpha is None else alpha


def _batches_per_epoch(loader: Iterable[Batch]) -> int:
    try:
        count = len(loader)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"fit needs a loader with a len() (the schedule spans all steps), got "
            f"{type(loader).__name__}; pass a torch.utils.data.DataLoader or a list of batches"
        ) from None
    if count < 1:
        raise ValueError("fit: the loader yields no batches")
    return count


def _train_epoch(
    model: nn.Module,
    loader: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    teacher: nn.Module | None,
    temperature: float,
    alpha: float,
) -> float:
    """One pass over ``loader``; the mean loss over its batches."""
    model.train()
    total, count = 0.0, 0
    for *inputs, labels in loader:
        optimizer.zero_grad()
        out = model(*inputs)
        if teacher is None:
            loss = F.cross_entropy(out, labels)
        else:
            with torch.no_grad():
                target = teacher(*inputs)
            loss = distill_loss(out, target, labels, temperature, alpha)
        loss.backward()
        optimizer.step()
        schedule.step()
        total += loss.item()
        count += 1
    return total / count
