"""Loss functions of the methods, as pure functions.

- ``nt_xent``: SimCLR's normalized temperature-scaled cross entropy (Chen et al. 2020, eq. 1).
- ``moco_info_nce``: MoCo's InfoNCE with a queue of negatives (He et al. 2020, eq. 1).
- ``byol_loss``: BYOL's normalized regression 2 - 2 cos(p, z) (Grill et al. 2020, eq. 2).
- ``cpc_info_nce``: image CPC's InfoNCE over patch vectors (Oord et al. 2018, eq. 4).
- ``cpc_sequence_info_nce``: CPC's InfoNCE over a sequence (audio, Oord et al. 2018, sec. 3.1 and eq. 4).
- ``sinkhorn_knopp``, ``swav_loss``: SwAV's codes and swapped prediction (Caron et al. 2020, eq. 1-4).
- ``dino_loss``, ``dino_center``, ``teacher_temperature``: DINO's cross entropy between teacher and
  student, its centering and the teacher temperature warm-up (Caron et al. 2021, sec. 3.1, alg. 1).
- ``simsiam_loss``: SimSiam's symmetric negative cosine with stop-gradient (Chen & He 2021, eq. 1-4).
- ``barlow_twins_loss``: Barlow Twins' cross-correlation loss (Zbontar et al. 2021, eq. 1-2).
- ``vicreg_loss``: VICReg's invariance, variance and covariance terms (Bardes et al. 2022, eq. 1-6).
- ``nnclr_loss``: NNCLR's NT-Xent with support-set neighbours as anchors (Dwibedi et al. 2021, eq. 2).

Each loss computes in float32 with autocast off (``_float32``), so under ``precision="bf16-mixed"``
(or 16-mixed) the normalization, the similarity logits and the softmax are not rounded to 16 bits;
gradients flow back to the 16-bit projections through the casts.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lightning_ssl.distributed import (
    all_reduce_sum,
    all_reduce_with_grad,
    gather_no_grad,
    gather_with_grad,
    rank,
    world_size,
)

__all__ = [
    "at_least_float32",
    "float32_loss",
    "nt_xent",
    "moco_info_nce",
    "byol_loss",
    "cpc_info_nce",
    "cpc_sequence_info_nce",
    "NEGATIVES",
    "sinkhorn_knopp",
    "swav_loss",
    "dino_loss",
    "dino_center",
    "teacher_temperature",
    "simsiam_loss",
    "barlow_twins_loss",
    "vicreg_loss",
    "nnclr_loss",
]

NEGATIVES = ("batch", "same_sequence")


def at_least_float32(x):
    """``x`` with every float16/bfloat16 tensor (also inside lists and tuples) cast to float32; float32 and
    float64 tensors and other values as they are (so a float64 model stays float64)."""
    if isinstance(x, torch.Tensor):
        return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if isinstance(x, (list, tuple)):
        return type(x)(at_least_float32(t) for t in x)
    return x


def float32_loss(loss_fn):
    """Run ``loss_fn`` with autocast disabled and its 16-bit tensor arguments (also inside list and tuple
    arguments, e.g. DINO's views) cast to float32 (``at_least_float32``), so that under
    ``precision="bf16-mixed"`` softmaxes, logarithms and sums are not rounded to 16 bits."""

    @functools.wraps(loss_fn)
    def wrapper(*args, **kwargs):
        args = [at_least_float32(a) for a in args]
        kwargs = {k: at_least_float32(v) for k, v in kwargs.items()}
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device_type=device, enabled=False):
            return loss_fn(*args, **kwargs)

    return wrapper


@float32_loss
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, gather: bool = True) -> torch.Tensor:
    """NT-Xent over the 2N views: each view's positive is its pair, all other 2N-2 views are negatives.

    Args:
        z1, z2: ``N x D`` projections of the two views (row i of both is the same image).
        temperature: tau in eq. 1.
        gather: in a distributed run, take negatives from every process (gathered with gradients),
            so the loss equals that of one process holding the global batch.
    Returns the mean loss over this process's 2N anchors.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"z1 and z2 must both be N x D, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    z1 = F.normalize(z1, dim=1)
    z2 = F.normalize(z2, dim=1)
    n = z1.shape[0]
    offset = 0
    all1, all2 = z1, z2
    if gather:
        all1, all2 = gather_with_grad(z1), gather_with_grad(z2)
        offset = rank() * n
    total = all1.shape[0]
    candidates = torch.cat([all1, all2], dim=0)  # 2N_global x D
    anchors = torch.cat([z1, z2], dim=0)  # 2n x D
    logits = anchors @ candidates.T / temperature  # 2n x 2N_global
    local = torch.arange(n, device=z1.device) + offset
    self_idx = torch.cat([local, local + total])
    pos_idx = torch.cat([local + total, local])
    rows = torch.arange(2 * n, device=z1.device)
    logits = logits.index_put((rows, self_idx), torch.tensor(float("-inf"), device=logits.device, dtype=logits.dtype))
    return F.cross_entropy(logits, pos_idx)


@float32_loss
def moco_info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """InfoNCE of MoCo: positive q.k, negatives q.queue (the queue holds K normalized keys, ``K x D``).

    ``q`` and ``k`` are normalized here; ``k`` is treated as a constant (no gradient).
    """
    q = F.normalize(q, dim=1)
    k = F.normalize(k.detach(), dim=1)
    l_pos = (q * k).sum(dim=1, keepdim=True)  # N x 1
    l_neg = q @ queue.detach().T  # N x K
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # N x (1+K)
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels)


@float32_loss
def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``2 - 2 cos(p, z)``; ``z`` (the target projection) gets no gradient."""
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=1)).mean()


def cpc_info_nce(
    predictions: torch.Tensor, targets: torch.Tensor, steps: Sequence[int], gather: bool = True
) -> torch.Tensor:
    """InfoNCE of image CPC: each prediction must pick its patch vector among all patch vectors.

    Args:
        predictions: ``B x S x D x rows x cols``; ``predictions[:, s, :, i, j]`` (= W_k c_ij for
            ``k = steps[s]``) predicts ``targets[:, :, i + k, j]``. Rows ``i >= rows - k`` have no
            target and are ignored.
        targets: ``B x D x rows x cols`` patch vectors z.
        steps: the offsets k (rows below) of the S predictions, each in ``1 .. rows - 1``.
        gather: in a distributed run, the candidates are the patch vectors of every process
            (gathered with gradients); a no-op in one process.
    The logits are dot products ``z_n . W_k c_ij`` against all ``N = B x rows x cols`` candidates
    (one matrix product per step): the positive, and as negatives every other patch of the same
    image and of the other images. Returns the mean over steps of the mean cross entropy over
    positions; it is ``log N`` when all logits are equal.
    """
    if predictions.ndim != 5 or targets.ndim != 4:
        raise ValueError(
            f"predictions must be B x S x D x rows x cols and targets B x D x rows x cols, got "
            f"{tuple(predictions.shape)} and {tuple(targets.shape)}"
        )
    b, s, d, rows, cols = predictions.shape
    if targets.shape != (b, d, rows, cols):
        raise ValueError(f"targets of shape {tuple(targets.shape)} do not match predictions {tuple(predictions.shape)}")
    if len(steps) != s:
        raise ValueError(f"{s} predictions per position but {len(steps)} steps {list(steps)}")
    if any(k < 1 or k >= rows for k in steps):
        raise ValueError(f"every step must lie in 1..{rows - 1} for a grid of {rows} rows, got {list(steps)}")
    # Logits in at least float32, also under mixed precision: unnormalized dot products overflow fp16.
    dtype = torch.promote_types(targets.dtype, torch.float32)
    predictions, targets = predictions.to(dtype), targets.to(dtype)
    local = targets.permute(0, 2, 3, 1).reshape(b * rows * cols, d)  # row-major: (b, i, j)
    candidates, offset = local, 0
    if gather:
        candidates = gather_with_grad(local)
        offset = rank() * local.shape[0]
    image = torch.arange(b, device=targets.device).view(b, 1, 1) * rows * cols
    col = torch.arange(cols, device=targets.device).view(1, 1, cols)
    losses = []
    with torch.autocast(device_type=targets.device.type, enabled=False):
        for idx, k in enumerate(steps):
            queries = predictions[:, idx, :, : rows - k].permute(0, 2, 3, 1).reshape(-1, d)
            row = torch.arange(k, rows, device=targets.device).view(1, rows - k, 1) * cols
            positives = (offset + image + row + col).reshape(-1)  # index of the patch k rows below
            losses.append(F.cross_entropy(queries @ candidates.T, positives))
    return torch.stack(losses).mean()


def cpc_sequence_info_nce(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    steps: Sequence[int],
    negatives: str = "batch",
    gather: bool = True,
) -> torch.Tensor:
    """InfoNCE of CPC on sequences (audio): each prediction W_k c_t must pick z_{t+k} among candidates.

    Args:
        predictions: ``B x S x T x D``; ``predictions[:, s, t]`` (= W_k c_t for ``k = steps[s]``)
            predicts ``targets[:, t + k]``. Positions ``t >= T - k`` have no target and are ignored.
        targets: ``B x T x D`` vectors z.
        steps: the offsets k of the S predictions, each in ``1 .. T - 1``.
        negatives: the candidates of a prediction: ``"batch"`` (the paper's choice): every z of every
            sequence of the batch, i.e. the other positions of the same sequence and all positions
            of the other sequences, gathered across processes when ``gather`` (``cpc_info_nce`` with
            time as rows); ``"same_sequence"``: the positions of the prediction's own sequence only.
        gather: in a distributed run, ``"batch"`` candidates come from every process (with gradients).
    Returns the mean over steps of the mean cross entropy over positions; ``log N`` when all logits
    are equal (``N = B x T``, global batch, for ``"batch"``; ``N = T`` for ``"same_sequence"``).
    """
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {', '.join(NEGATIVES)}; got {negatives!r}")
    if predictions.ndim != 4 or targets.ndim != 3:
        raise ValueError(
            f"predictions must be B x S x T x D and targets B x T x D, got "
            f"{tuple(predictions.shape)} and {tuple(targets.shape)}"
        )
    b, s, t, d = predictions.shape
    if targets.shape != (b, t, d):
        raise ValueError(f"targets of shape {tuple(targets.shape)} do not match predictions {tuple(predictions.shape)}")
    if negatives == "batch":
        # time plays the part of the rows of a one-column grid
        return cpc_info_nce(
            predictions.permute(0, 1, 3, 2).unsqueeze(-1), targets.transpose(1, 2).unsqueeze(-1), steps, gather
        )
    if len(steps) != s:
        raise ValueError(f"{s} predictions per position but {len(steps)} steps {list(steps)}")
    if any(k < 1 or k >= t for k in steps):
        raise ValueError(f"every step must lie in 1..{t - 1} for sequences of {t} vectors, got {list(steps)}")
    dtype = torch.promote_types(targets.dtype, torch.float32)
    predictions, targets = predictions.to(dtype), targets.to(dtype)
    losses = []
    with torch.autocast(device_type=targets.device.type, enabled=False):
        for idx, k in enumerate(steps):
            logits = predictions[:, idx, : t - k] @ targets.transpose(1, 2)  # B x (T - k) x T
            positives = torch.arange(k, t, device=targets.device).expand(b, t - k)
            losses.append(F.cross_entropy(logits.reshape(-1, t), positives.reshape(-1)))
    return torch.stack(losses).mean()


# --- SwAV, DINO


@torch.no_grad()
@float32_loss
def sinkhorn_knopp(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """SwAV's equipartitioned soft codes (Caron et al. 2020, sec. 3.1 and eq. 3; algorithm of the
    paper's code): ``Q = exp(scores / epsilon)`` normalized alternately so that each prototype receives
    ``B / K`` of the mass and each sample a total of 1, ``iterations`` times, over the *global* batch
    (the sums are all-reduced across processes). Ends on the per-sample normalization, so every row of
    the result sums to 1 exactly; the prototype sums approach ``B / K`` as ``iterations`` grows.

    Args:
        scores: ``B x K`` prototype scores of this process's samples (``z^T c``).
    Returns ``B x K`` codes (no gradient).
    """
    # exp(s/eps) up to the global maximum: a constant factor that the first normalization removes
    peak = gather_no_grad(scores.amax().reshape(1)).amax()
    q = torch.exp((scores - peak) / epsilon).t()  # K x B
    k = q.shape[0]
    b = q.shape[1] * world_size()
    q = q / all_reduce_sum(q.sum())
    for _ in range(iterations):
        q = q / all_reduce_sum(q.sum(dim=1, keepdim=True)) / k  # each prototype: 1 / K of the mass
        q = q / q.sum(dim=0, keepdim=True) / b  # each sample: 1 / B
    return (q * b).t()


@float32_loss
def swav_loss(scores: Sequence[torch.Tensor], codes: Sequence[torch.Tensor], temperature: float = 0.1) -> torch.Tensor:
    """SwAV's swapped prediction (Caron et al. 2020, eq. 1-2, with multi-crop, eq. 4): for each view
    ``i`` with codes ``codes[i]`` (the global views), the mean over the other views ``v`` of the cross
    entropy ``-sum_k q_i,k log softmax(scores_v / temperature)_k``, averaged over samples and over ``i``.

    Args:
        scores: one ``B x K`` tensor of prototype scores per view (global views first).
        codes: the ``B x K`` codes of the first ``len(codes)`` views (``sinkhorn_knopp``).
    """
    if len(codes) < 1 or len(scores) < 2 or len(codes) > len(scores):
        raise ValueError(f"need >= 2 views and 1..len(views) codes, got {len(scores)} views, {len(codes)} codes")
    log_p = [F.log_softmax(s / temperature, dim=1) for s in scores]
    total = scores[0].new_zeros(())
    for i, q in enumerate(codes):
        sub = sum(-(q * log_p[v]).sum(dim=1).mean() for v in range(len(scores)) if v != i)
        total = total + sub / (len(scores) - 1)
    return total / len(codes)


def teacher_temperature(epoch: int, start: float = 0.04, end: float = 0.07, warmup_epochs: int = 30) -> float:
    """DINO's teacher temperature at ``epoch`` (Caron et al. 2021, sec. 4.1 and the paper's code): linear
    from ``start`` at epoch 0 to ``end`` at epoch ``warmup_epochs - 1`` (``np.linspace``), then ``end``."""
    if epoch >= warmup_epochs:
        return end
    if warmup_epochs == 1:
        return start
    return start + (end - start) * epoch / (warmup_epochs - 1)


@float32_loss
def dino_loss(
    student: Sequence[torch.Tensor],
    teacher: Sequence[torch.Tensor],
    center: torch.Tensor,
    student_temperature: float = 0.1,
    teacher_temperature: float = 0.04,
) -> torch.Tensor:
    """DINO's loss (Caron et al. 2021, eq. 1-3 and algorithm 1): for every teacher view ``t`` (the global
    views) and every student view ``s != t``, ``H(P_t, P_s) = -sum_k P_t,k log P_s,k`` with
    ``P_t = softmax((g_t - center) / teacher_temperature)`` (no gradient) and
    ``P_s = softmax(g_s / student_temperature)``, averaged over samples and over the pairs.

    Args:
        student: one ``B x K`` tensor of student head outputs per view (global views first).
        teacher: the teacher's ``B x K`` outputs of the global views (their indices among ``student``).
        center: ``K`` or ``1 x K`` running center of the teacher outputs (``dino_center``).
    """
    if len(teacher) < 1 or len(student) < 2 or len(teacher) > len(student):
        raise ValueError(
            f"need >= 2 student views and 1..len(student) teacher views, got {len(student)}, {len(teacher)}"
        )
    targets = [F.softmax((t.detach() - center.reshape(1, -1)) / teacher_temperature, dim=1) for t in teacher]
    log_p = [F.log_softmax(s / student_temperature, dim=1) for s in student]
    total, pairs = student[0].new_zeros(()), 0
    for i, q in enumerate(targets):
        for v in range(len(student)):
            if v != i:
                total = total + (-(q * log_p[v]).sum(dim=1)).mean()
                pairs += 1
    return total / pairs


@torch.no_grad()
@float32_loss
def dino_center(center: torch.Tensor, teacher: Sequence[torch.Tensor], momentum: float = 0.9) -> torch.Tensor:
    """DINO's center update (Caron et al. 2021, eq. 4): ``momentum * center + (1 - momentum) * mean`` of
    the teacher outputs of all global views over the *global* batch (sums all-reduced across processes).
    Returns the new ``1 x K`` center."""
    outputs = torch.cat(list(teacher)).detach()
    batch_sum = all_reduce_sum(outputs.sum(dim=0, keepdim=True))
    batch_center = batch_sum / (outputs.shape[0] * world_size())
    return center.reshape(1, -1) * momentum + batch_center * (1 - momentum)


# --- SimSiam, Barlow Twins, VICReg, NNCLR
def _off_diagonal(m: torch.Tensor) -> torch.Tensor:
    """The ``d x (d - 1)`` off-diagonal entries of a square ``d x d`` matrix (a view, no copy)."""
    d = m.shape[0]
    return m.flatten()[:-1].view(d - 1, d + 1)[:, 1:]


@float32_loss
def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """SimSiam's symmetric negative cosine (Chen & He 2021, eq. 1-4): ``D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2``
    with ``D(p, z) = -cos(p, z)`` averaged over the batch; ``z1``, ``z2`` get no gradient (stop-gradient).
    Its minimum is -1."""
    if not p1.shape == p2.shape == z1.shape == z2.shape or p1.ndim != 2:
        raise ValueError(f"p1, p2, z1, z2 must all be N x D, got {[tuple(t.shape) for t in (p1, p2, z1, z2)]}")
    d12 = -F.cosine_similarity(p1, z2.detach(), dim=1).mean()
    d21 = -F.cosine_similarity(p2, z1.detach(), dim=1).mean()
    return 0.5 * d12 + 0.5 * d21


@float32_loss
def barlow_twins_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    lambd: float = 5e-3,
    scale: float = 1.0,
    eps: float = 1e-5,
    gather: bool = True,
) -> torch.Tensor:
    """Barlow Twins (Zbontar et al. 2021, eq. 1-2): ``scale * (sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2)``.

    ``C = z1_std^T z2_std / N`` is the cross-correlation of the embeddings standardized over the batch
    (mean 0, biased variance 1 per dimension with ``eps`` added, as the reference code's
    ``BatchNorm1d(affine=False)``). ``scale`` multiplies the whole loss: 1 in the reference code today
    (the first release scaled by 0.024 and used lambda 0.0051).

    In a distributed run with ``gather``, the batch means, variances and ``C`` are sums over processes
    (``all_reduce_with_grad``), so ``C`` (and the loss, the same on every process) equals that of one
    process holding the global batch of ``N = n x processes`` embeddings.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"z1 and z2 must both be N x D, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    reduce = all_reduce_with_grad if gather else (lambda t: t)
    total = z1.shape[0] * (world_size() if gather else 1)
    if total < 2:
        raise ValueError("Barlow Twins standardizes over the batch: it needs at least 2 embeddings")

    def standardize(z: torch.Tensor) -> torch.Tensor:
        centered = z - reduce(z.sum(dim=0)) / total
        var = reduce(centered.pow(2).sum(dim=0)) / total
        return centered / torch.sqrt(var + eps)

    c = reduce(standardize(z1).T @ standardize(z2)) / total  # D x D
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = _off_diagonal(c).pow(2).sum()
    return scale * (on_diag + lambd * off_diag)


@float32_loss
def vicreg_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    invariance: float = 25.0,
    variance: float = 25.0,
    covariance: float = 1.0,
    std_target: float = 1.0,
    eps: float = 1e-4,
    gather: bool = True,
) -> torch.Tensor:
    """VICReg (Bardes et al. 2022, eq. 1-6), in the form of the reference code:

    ``invariance * mse(z1, z2) + variance * (v(z1) + v(z2)) / 2 + covariance * (c(z1) + c(z2))`` with
    ``mse`` the mean squared difference over samples and dimensions, ``v(z) = mean_j relu(std_target -
    sqrt(Var(z_j) + eps))`` (unbiased variance) and ``c(z) = sum_{i != j} Cov(z)_ij^2 / d`` (covariance
    divided by ``N - 1``). The paper's eq. 6 has no ``/ 2`` and sums the invariance over dimensions;
    the defaults 25 / 25 / 1 go with the code's form.

    With ``gather`` in a distributed run, variance and covariance are computed over the global batch
    (``gather_with_grad``); the invariance term is per sample, over this process's batch.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"z1 and z2 must both be N x D, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    inv = F.mse_loss(z1, z2)
    if gather:
        z1, z2 = gather_with_grad(z1), gather_with_grad(z2)
    n, d = z1.shape
    if n < 2:
        raise ValueError("VICReg's variance and covariance need at least 2 embeddings in the (global) batch")

    def var_cov(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        centered = z - z.mean(dim=0)
        std = torch.sqrt(centered.pow(2).sum(dim=0) / (n - 1) + eps)
        cov = centered.T @ centered / (n - 1)
        return F.relu(std_target - std).mean(), _off_diagonal(cov).pow(2).sum() / d

    v1, c1 = var_cov(z1)
    v2, c2 = var_cov(z2)
    return invariance * inv + variance * (v1 + v2) / 2 + covariance * (c1 + c2)


@float32_loss
def nnclr_loss(nn: torch.Tensor, p: torch.Tensor, temperature: float = 0.1, gather: bool = True) -> torch.Tensor:
    """NNCLR's loss (Dwibedi et al. 2021, eq. 2, with the prediction head of sec. 3.2): row i's positive is
    ``p_i``; the other predictions of the batch are its negatives.

    ``-log exp(nn_i . p_i / t) / sum_k exp(nn_i . p_k / t)`` averaged over this process's ``n`` rows, with
    ``nn`` (the support-set neighbours of one view, no gradient) and ``p`` (the predictions of the other
    view) normalized here. With ``gather`` in a distributed run, ``k`` runs over the global batch
    (``gather_with_grad``), so the mean over processes equals one process holding the global batch.
    """
    if nn.shape != p.shape or nn.ndim != 2:
        raise ValueError(f"nn and p must both be N x D, got {tuple(nn.shape)} and {tuple(p.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    nn = F.normalize(nn.detach(), dim=1)
    p = F.normalize(p, dim=1)
    candidates, offset = p, 0
    if gather:
        candidates, offset = gather_with_grad(p), rank() * p.shape[0]
    logits = nn @ candidates.T / temperature  # n x N
    return F.cross_entropy(logits, torch.arange(p.shape[0], device=p.device) + offset)
