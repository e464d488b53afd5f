import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from retrieval.frequency import ExactItemFrequency
from retrieval.losses import (
    LOGQ_VARIANTS,
    FullSoftmaxLoss,
    ImpressionBCELoss,
    NegativeSamplerConfig,
    RetrievalLossConfig,
    SampledBinaryLoss,
    SampledSoftmaxLoss,
    bce_sampled_loss,
    bpr_loss,
    build_loss,
    full_softmax_loss,
    gbce_beta,
    gbce_loss,
    impression_bce_loss,
    sampled_softmax_loss,
)
from retrieval.similarity import Similarity, SimilarityConfig

torch.set_num_threads(1)

DOT = Similarity(SimilarityConfig(kind="dot", temperature=None))


def _rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def _grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


def _zipf(n, s=1.0, seed=0):
    rng = np.random.default_rng(seed)
    w = 1.0 / np.arange(1, n + 1) ** s
    return torch.tensor(rng.permutation(w / w.sum()))


# ---------------------------------------------------------------- full softmax


def test_full_softmax_equals_cross_entropy():
    u, table = _rand(6, 4, seed=1), _rand(30, 4, seed=2)
    pos = torch.tensor([0, 5, 5, 29, 7, 1])
    torch.testing.assert_close(
        full_softmax_loss(u, pos, table, DOT), F.cross_entropy(u @ table.T, pos)
    )
    cos = Similarity(SimilarityConfig(kind="cosine", temperature=0.1))
    ref = F.cross_entropy(F.normalize(u, dim=1) @ F.normalize(table, dim=1).T / 0.1, pos)
    torch.testing.assert_close(full_softmax_loss(u, pos, table, cos), ref)


def test_full_softmax_exclude_matches_masked_reference():
    u, table = _rand(3, 4, seed=3), _rand(20, 4, seed=4)
    pos = torch.tensor([2, 7, 11])
    exclude = torch.tensor([[3, 4, -1], [7, 19, 0], [-1, -1, -1]])  # row 1 lists its positive
    logits = u @ table.T
    logits[0, [3, 4]] = float("-inf")
    logits[1, [19, 0]] = float("-inf")  # the positive 7 is never excluded
    ref = F.cross_entropy(logits, pos, reduction="none")
    for chunk in (100, 6):
        got = full_softmax_loss(
            u, pos, table, DOT, exclude=exclude, chunk_size=chunk, reduction="none"
        )
        torch.testing.assert_close(got, ref)


class _Tower(nn.Module):
    def __init__(self, n, d, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Parameter(torch.randn(n, d, generator=g, dtype=torch.float64))
        self.lin = nn.Linear(d, d, dtype=torch.float64)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5)

    def forward(self, ids):
        return self.lin(self.emb[ids])


@pytest.mark.parametrize("kind", ["dot", "cosine"])
def test_full_softmax_chunked_equals_unchunked(kind):
    n, b, d = 101, 7, 5
    sim = Similarity(
        SimilarityConfig(kind=kind, learnable_temperature=True, temperature=None, init_log_tau=-1.0)
    ).double()
    tower = _Tower(n, d, seed=5)
    u0 = _rand(b, d, seed=6)
    pos = torch.tensor([0, 1, 100, 50, 50, 3, 99])
    exclude = torch.tensor([[1, 2], [-1, -1], [0, 100], [51, -1], [-1, 52], [3, 4], [98, 97]])

    def run(chunk):
        tower.zero_grad()
        sim.zero_grad()
        u = u0.clone().requires_grad_()
        loss = full_softmax_loss(u, pos, tower, sim, n_items=n, chunk_size=chunk, exclude=exclude)
        loss.backward()
        grads = [
            u.grad,
            tower.emb.grad,
            tower.lin.weight.grad,
            tower.lin.bias.grad,
            sim.log_tau.grad,
        ]
        return loss.detach(), [g.clone() for g in grads]

    ref_loss, ref_grads = run(10_000)
    for chunk in (10, 33, 100):
        loss, grads = run(chunk)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_full_softmax_chunked_without_grad_and_module_form():
    table, u = _rand(40, 3, seed=7), _rand(4, 3, seed=8)
    pos = torch.tensor([1, 2, 3, 39])
    with torch.no_grad():
        a = full_softmax_loss(u, pos, table, DOT, chunk_size=9)
    torch.testing.assert_close(a, F.cross_entropy(u @ table.T, pos))
    module = build_loss(RetrievalLossConfig(kind="full_softmax", chunk_size=9), 40, DOT)
    assert isinstance(module, FullSoftmaxLoss)
    torch.testing.assert_close(module(u, pos, table[pos], table), a)
    with pytest.raises(ValueError, match="n_items"):
        full_softmax_loss(u, pos, lambda ids: table[ids], DOT)
    with pytest.raises(ValueError, match="positives"):
        full_softmax_loss(u, torch.tensor([1, 2, 3, 40]), table, DOT)


# ---------------------------------------------------------------- sampled == full


def test_sampled_with_whole_catalog_equals_full_softmax_functional():
    n, b, d = 60, 9, 6
    u, table = _rand(b, d, seed=9), _rand(n, d, seed=10)
    pos = torch.tensor([0, 4, 4, 59, 30, 2, 2, 2, 17])

    def sampled(u, t):
        return sampled_softmax_loss(u, t[pos], pos, t, torch.arange(n), DOT, logq="none")

    def full(u, t):
        return full_softmax_loss(u, pos, t, DOT)

    ls, gs = _grads(sampled, u, table)
    lf, gf = _grads(full, u, table)
    torch.testing.assert_close(ls, lf, rtol=1e-12, atol=1e-12)
    for a, r in zip(gs, gf, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)
    # Without masking the positive would count twice: a different loss.
    twice = sampled_softmax_loss(
        u, table[pos], pos, table, torch.arange(n), DOT, logq="none", mask_accidental_hits=False
    )
    assert float(twice) > float(lf) + 0.01


@pytest.mark.parametrize("kind", ["dot", "cosine"])
def test_sampled_in_batch_over_whole_catalog_equals_full_softmax_module(kind):
    # A batch whose positives are the whole catalog: in-batch negatives = every other item.
    n, d = 40, 5
    sim = Similarity(SimilarityConfig(kind=kind, temperature=0.5))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    u, table = _rand(n, d, seed=11), _rand(n, d, seed=12)
    loss = SampledSoftmaxLoss(NegativeSamplerConfig(in_batch=True, logq="none"), n, sim)

    ls, gs = _grads(lambda u, t: loss(u, perm, t[perm]), u, table)
    lf, gf = _grads(lambda u, t: full_softmax_loss(u, perm, t, sim), u, table)
    torch.testing.assert_close(ls, lf, rtol=1e-12, atol=1e-12)
    for a, r in zip(gs, gf, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- logQ: formulas and convergence


def test_logq_variants_match_lecture_formulas():
    # Hand-built case: 2 rows, 3 shared negatives with given log Q.
    u = torch.tensor([[1.0, 0.0], [0.5, -1.0]], dtype=torch.float64)
    pv = torch.tensor([[2.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    nv = torch.tensor([[1.0, 1.0], [-1.0, 0.5], [0.3, 0.3]], dtype=torch.float64)
    pos_ids, neg_ids = torch.tensor([10, 11]), torch.tensor([20, 21, 22])
    lq_neg = torch.log(torch.tensor([0.5, 0.1, 0.01], dtype=torch.float64))
    lq_pos = torch.log(torch.tensor([0.2, 0.05], dtype=torch.float64))
    fp = (u * pv).sum(1)
    fd = u @ nv.T
    corrected = torch.logsumexp(fd - lq_neg, 1)
    expected = {
        "none": torch.logaddexp(fp, torch.logsumexp(fd, 1)) - fp,
        "derived": corrected - fp,  # positive NOT in the denominator
        "positive_and_negatives": torch.logaddexp(fp - lq_pos, corrected) - (fp - lq_pos),
        "negatives_only": torch.logaddexp(fp, corrected) - fp,  # L_logQ3
    }
    for variant in LOGQ_VARIANTS:
        got = sampled_softmax_loss(
            u, pv, pos_ids, nv, neg_ids, DOT,
            neg_log_q=lq_neg, pos_log_q=lq_pos, logq=variant, reduction="none",
        )  # fmt: skip
        torch.testing.assert_close(got, expected[variant], msg=variant)


def _mixture_reference(u, pv, pos, keys, ids, q_mix, n_draws, logq, scale, mask):
    """Dense per-row reference of the module's loss, from the mixture Q given as a function."""
    shift = math.log(n_draws) if scale == "expected_count" else 0.0
    fp = (u * pv).sum(1)
    logits = u @ keys.T
    if logq != "none":
        logits = logits - (torch.log(q_mix(ids)) + shift)[None, :]
    logits = logits.masked_fill(mask, float("-inf"))
    lse = torch.logsumexp(logits, 1)
    if logq == "derived":
        return lse - fp
    pt = fp - (torch.log(q_mix(pos)) + shift) if logq == "positive_and_negatives" else fp
    return torch.logaddexp(pt, lse) - pt


@pytest.mark.parametrize("logq", LOGQ_VARIANTS)
@pytest.mark.parametrize("scale", ["expected_count", "probability"])
def test_mixture_q_golden(logq, scale):
    # In-batch (B - 1 = 4 per row) + 6 uniform + 5 popularity^0.5 negatives:
    # Q(d) = (4 p(d) + 6 / N + 5 q_pop(d)) / 15. Values and gradients against a dense
    # autograd reference (the module computes its own backward).
    n, b, d = 30, 5, 4
    p = _zipf(n, seed=1)
    u, table = _rand(b, d, seed=13), _rand(n, d, seed=14)
    pos = torch.tensor([3, 8, 8, 0, 21])
    cfg = NegativeSamplerConfig(
        uniform=6, popularity=5, popularity_alpha=0.5, in_batch=True, logq=logq, logq_scale=scale
    )
    loss = SampledSoftmaxLoss(cfg, n, DOT)
    w = torch.arange(1.0, b + 1, dtype=torch.float64)  # distinct row weights for the gradient

    def module(u, t):
        gen = torch.Generator().manual_seed(7)
        return (loss(u, pos, t[pos], lambda i: t[i], gen, p, reduction="none") * w).sum()

    g = torch.Generator().manual_seed(7)  # replay the module's draws
    uni = torch.randint(n, (6,), generator=g)
    q_pop = p**0.5 / (p**0.5).sum()
    popn = torch.multinomial(q_pop, 5, replacement=True, generator=g)
    ids = torch.cat([pos, uni, popn])

    def q_mix(i):
        return (4 * p[i] + 6 / n + 5 * q_pop[i]) / 15

    mask = ids[None, :] == pos[:, None]  # accidental hits, own in-batch column included

    def reference(u, t):
        rows = _mixture_reference(u, t[pos], pos, t[ids], ids, q_mix, 15, logq, scale, mask)
        return (rows * w).sum()

    got, got_grads = _grads(module, u, table)
    ref, ref_grads = _grads(reference, u, table)
    torch.testing.assert_close(got, ref)
    for a, r in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, r)


def test_popularity_sampling_follows_frequency_power():
    n = 20
    p = _zipf(n, seed=2)
    table = _rand(n, 3, seed=15)
    seen = []
    cfg = NegativeSamplerConfig(
        popularity=20_000, popularity_alpha=0.5, in_batch=False, logq="none"
    )
    loss = SampledSoftmaxLoss(cfg, n, DOT)

    def encode(ids):
        seen.append(ids)
        return table[ids]

    loss(_rand(2, 3), torch.tensor([0, 1]), table[:2], encode, torch.Generator().manual_seed(0), p)
    freq = torch.bincount(seen[0], minlength=n).double() / 20_000
    target = p**0.5 / (p**0.5).sum()
    assert (freq - target).abs().max() < 0.01


def _convergence(variant, n_values, u0, table0, pos, p, mask=True, scale="expected_count"):
    n_items = table0.shape[0]
    _, g_full = _grads(lambda u, t: full_softmax_loss(u, pos, t, DOT), u0, table0)
    g_full = torch.cat([g.ravel() for g in g_full])
    out = []
    for n in n_values:
        cfg = NegativeSamplerConfig(
            popularity=n, in_batch=False, logq=variant, mask_accidental_hits=mask, logq_scale=scale
        )
        loss = SampledSoftmaxLoss(cfg, n_items, DOT)
        dist = []
        for seed in range(3):
            gen = torch.Generator().manual_seed(seed)
            _, gs = _grads(
                lambda u, t, loss=loss, gen=gen: loss(u, pos, t[pos], lambda i: t[i], gen, p),
                u0,
                table0,
            )
            gs = torch.cat([g.ravel() for g in gs])
            dist.append(float((gs - g_full).norm() / g_full.norm()))
        out.append(np.mean(dist))
    return out


def test_logq_gradient_converges_to_full_softmax_gradient():
    # Popularity proposal (Zipf, alpha = 1), popular items with larger norms.
    n_items, b, d = 1000, 16, 8
    g = torch.Generator().manual_seed(0)
    p = _zipf(n_items, seed=0)
    table = torch.randn(n_items, d, generator=g, dtype=torch.float64)
    u = torch.randn(b, d, generator=g, dtype=torch.float64)
    table = table * (1 + 2 * (p / p.max()).sqrt())[:, None]
    pos = torch.multinomial(p, b, replacement=True, generator=g)
    ns = [16, 256, 4096]
    for variant in ("derived", "positive_and_negatives", "negatives_only"):
        dist = _convergence(variant, ns, u, table, pos, p)
        assert dist[0] > dist[1] > dist[2], (variant, dist)
        assert dist[2] < 0.15, (variant, dist)
    biased = _convergence("none", ns, u, table, pos, p)
    assert biased[2] > 0.3 and biased[2] > 2.5 * dist[2], biased


def test_logq3_with_masking_needs_expected_count_scale():
    # A confident model (P(p|u) about 0.4): masking the positive among the negatives leaves
    # the estimate of sum_{d != p}; only log(n Q) weighs the kept positive correctly.
    n_items, b, d = 1000, 16, 8
    g = torch.Generator().manual_seed(0)
    p = _zipf(n_items, seed=0)
    table = torch.randn(n_items, d, generator=g, dtype=torch.float64)
    u = torch.randn(b, d, generator=g, dtype=torch.float64)
    pos = (u @ table.T).argmax(1)
    u = 1.5 * u
    ns = [256, 4096, 32768]
    good = _convergence("negatives_only", ns, u, table, pos, p)
    assert good[0] > good[1] > good[2] and good[2] < 0.2, good
    literal = _convergence("negatives_only", ns, u, table, pos, p, scale="probability")
    assert min(literal) > 0.8, literal
    # The derived estimator is consistent only when the positive may appear among negatives.
    unmasked = _convergence("derived", ns, u, table, pos, p, mask=False)
    assert unmasked[2] < 0.25 and unmasked[0] > unmasked[2], unmasked
    masked = _convergence("derived", ns, u, table, pos, p, mask=True)
    assert min(masked) > 0.8, masked


# ---------------------------------------------------------------- masking, queue, numerics


def test_duplicate_positive_is_not_a_negative():
    u, table = _rand(4, 3, seed=16), _rand(10, 3, seed=17)
    pos = torch.tensor([3, 3, 5, 7])
    f = u @ table.T
    loss = SampledSoftmaxLoss(NegativeSamplerConfig(in_batch=True, logq="none"), 10, DOT)
    got = loss(u, pos, table[pos], reduction="none")
    ref0 = torch.logsumexp(f[0, [3, 5, 7]], 0) - f[0, 3]  # column 1 (also item 3) masked
    ref2 = torch.logsumexp(f[2, [5, 3, 3, 7]], 0) - f[2, 5]  # both 3s are true negatives of row 2
    torch.testing.assert_close(got[0], ref0)
    torch.testing.assert_close(got[2], ref2)
    # Without masking, the duplicate acts as a negative (only the row's own column is masked).
    raw = SampledSoftmaxLoss(
        NegativeSamplerConfig(in_batch=True, logq="none", mask_accidental_hits=False), 10, DOT
    )(u, pos, table[pos], reduction="none")
    torch.testing.assert_close(raw[0], torch.logsumexp(f[0, [3, 3, 5, 7]], 0) - f[0, 3])
    # Other positives of the user are masked too.
    other = torch.tensor([[5, -1], [-1, -1], [-1, -1], [-1, -1]])
    masked = loss(u, pos, table[pos], user_positive_ids=other, reduction="none")
    torch.testing.assert_close(masked[0], torch.logsumexp(f[0, [3, 7]], 0) - f[0, 3])


def test_memory_queue_fifo_bound_and_detached():
    n, d = 30, 3
    table = _rand(n, d, seed=18).requires_grad_()
    cfg = NegativeSamplerConfig(in_batch=True, memory_queue=5, logq="none")
    loss = SampledSoftmaxLoss(cfg, n, DOT)
    for ids, expect in [
        ([0, 1, 2], [0, 1, 2]),
        ([3, 4, 5], [1, 2, 3, 4, 5]),
        ([6, 7, 8], [4, 5, 6, 7, 8]),
        ([10, 11, 12, 13, 14, 15, 16], [12, 13, 14, 15, 16]),
    ]:
        ids = torch.tensor(ids)
        loss(_rand(len(ids), d, seed=19), ids, table[ids]).backward()
        vecs, qids = loss.queue_contents()
        assert qids.tolist() == expect
        assert vecs.shape == (len(expect), d) and not vecs.requires_grad
        torch.testing.assert_close(vecs, table.detach()[qids])
    loss.eval()  # no update outside training
    loss(_rand(2, d), torch.tensor([20, 21]), table[[20, 21]])
    assert loss.queue_contents()[1].tolist() == [12, 13, 14, 15, 16]
    loss.reset_queue()
    assert loss.queue_contents()[1].numel() == 0


def test_memory_queue_negatives_enter_the_loss_without_gradient():
    n, d = 30, 3
    cos = Similarity(SimilarityConfig(kind="cosine", temperature=0.2))
    table = _rand(n, d, seed=20)
    loss = SampledSoftmaxLoss(
        NegativeSamplerConfig(in_batch=True, memory_queue=4, logq="none"), n, cos
    )
    first = torch.tensor([1, 2, 3, 9])
    loss(_rand(4, d), first, table[first])
    t = table.clone().requires_grad_()
    u = _rand(2, d, seed=21)
    second = torch.tensor([9, 5])
    got = loss(u, second, t[second], reduction="none")
    got.sum().backward()
    # Queue keys are the cosine-prepared vectors of items 1, 2, 3, 9; 9 is row 0's positive.
    q = F.normalize(u, dim=1) / 0.2
    k = F.normalize(table, dim=1)
    f = q @ k.T
    ref0 = torch.logsumexp(f[0, [9, 5, 1, 2, 3]], 0) - f[0, 9]
    ref1 = torch.logsumexp(f[1, [5, 9, 1, 2, 3, 9]], 0) - f[1, 5]
    torch.testing.assert_close(got, torch.stack([ref0, ref1]))
    assert torch.all(t.grad[[1, 2, 3]] == 0)  # detached: past batches get no gradient


@pytest.mark.parametrize("logq", LOGQ_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_logits_and_zero_frequencies_are_finite(logq, dtype):
    n, d = 50, 4
    table = _rand(n, d, seed=22, scale=70.0).to(dtype)  # logits of order 1e4
    u = _rand(6, d, seed=23, scale=70.0).to(dtype)
    pos = torch.tensor([0, 1, 1, 2, 3, 4])
    cfg = NegativeSamplerConfig(uniform=8, popularity=8, in_batch=True, memory_queue=4, logq=logq)
    loss = SampledSoftmaxLoss(cfg, n, DOT)
    for freq in (torch.zeros(n), ExactItemFrequency(n)):  # never-seen items everywhere
        for _ in range(2):
            tt, uu = table.clone().requires_grad_(), u.clone().requires_grad_()
            out = loss(
                uu, pos, tt[pos], lambda i, tt=tt: tt[i], torch.Generator().manual_seed(0), freq
            )
            out.backward()
            assert torch.isfinite(out) and float((u @ table.T).abs().max()) > 1e4
            assert torch.isfinite(uu.grad).all() and torch.isfinite(tt.grad).all()


@pytest.mark.parametrize("logq", LOGQ_VARIANTS)
def test_row_with_all_negatives_masked_is_finite(logq):
    table = _rand(10, 3, seed=24)
    pos = torch.tensor([4, 4, 4])  # in-batch only: every negative is the positive itself
    loss = SampledSoftmaxLoss(NegativeSamplerConfig(in_batch=True, logq=logq), 10, DOT)
    tt, u = table.clone().requires_grad_(), _rand(3, 3, seed=25).requires_grad_()
    out = loss(u, pos, tt[pos], frequency=torch.ones(10), reduction="none")
    out.sum().backward()
    torch.testing.assert_close(out, torch.zeros(3, dtype=torch.float64))
    assert torch.all(u.grad == 0) and torch.all(tt.grad == 0)  # finite, and no signal
    for fn in (bce_sampled_loss, bpr_loss):
        val = fn(torch.tensor([1.0]), torch.tensor([[float("-inf")]]), torch.tensor([[False]]))
        assert torch.isfinite(val)


def test_same_seed_same_loss_and_input_validation():
    n = 40
    table, u = _rand(n, 4, seed=26), _rand(5, 4, seed=27)
    pos = torch.tensor([1, 2, 3, 4, 5])
    loss = SampledSoftmaxLoss(NegativeSamplerConfig(uniform=10, in_batch=True), n, DOT)
    freq = torch.ones(n)

    def run(seed):
        return loss(
            u, pos, table[pos], lambda i: table[i], torch.Generator().manual_seed(seed), freq
        )

    assert float(run(3)) == float(run(3)) != float(run(4))
    with pytest.raises(ValueError, match="pos_ids"):
        loss(
            u,
            torch.tensor([1, 2, 3, 4, 40]),
            table[:5],
            lambda i: table[i],
            torch.Generator(),
            freq,
        )
    with pytest.raises(ValueError, match="generator"):
        loss(u, pos, table[pos], lambda i: table[i], None, freq)
    with pytest.raises(ValueError, match="frequency"):
        loss(u, pos, table[pos], lambda i: table[i], torch.Generator())
    with pytest.raises(ValueError, match="frequency array"):
        loss(u, pos, table[pos], lambda i: table[i], torch.Generator(), torch.ones(n + 1))
    with pytest.raises(ValueError, match="pos_vecs"):
        loss(u, pos, table[:4], lambda i: table[i], torch.Generator(), freq)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"uniform": -1}, "uniform"),
        ({"memory_queue": 2.5}, "memory_queue"),
        ({"logq": "both"}, "logq"),
        ({"logq_floor": 0.0}, "logq_floor"),
        ({"logq_scale": "count"}, "logq_scale"),
        ({"cross_device": True, "in_batch": False, "uniform": 3}, "cross_device"),
        ({"in_batch": False}, "no negative source"),
        ({"popularity_alpha": -1.0}, "popularity_alpha"),
    ],
)
def test_sampler_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NegativeSamplerConfig(**kwargs)


def test_frequency_forms_agree():
    # An ItemFrequency, a count array and a log-probability function give the same loss.
    n = 25
    counts = np.random.default_rng(0).integers(1, 20, size=n)
    est = ExactItemFrequency.from_counts(counts)
    p = torch.tensor(counts / counts.sum())
    table, u = _rand(n, 3, seed=28), _rand(4, 3, seed=29)
    pos = torch.tensor([0, 5, 6, 7])
    loss = SampledSoftmaxLoss(NegativeSamplerConfig(uniform=5, popularity=5), n, DOT)
    vals = [
        loss(u, pos, table[pos], lambda i: table[i], torch.Generator().manual_seed(1), f)
        for f in (est, torch.tensor(counts), counts, lambda i: torch.log(p[i]))
    ]
    for v in vals[1:]:
        torch.testing.assert_close(v, vals[0])


# ---------------------------------------------------------------- binary losses


def test_bce_bpr_gbce_hand_computed():
    pos = torch.tensor([2.0, -1.0], dtype=torch.float64)
    neg = torch.tensor([[1.0, 0.0], [3.0, -2.0]], dtype=torch.float64)
    mask = torch.tensor([[True, False], [True, True]])

    def sp(x):  # softplus = -log sigmoid(-x)
        return math.log1p(math.exp(x))

    bce = ((sp(-2) + sp(1)) + (sp(1) + sp(3) + sp(-2))) / 2
    assert float(bce_sampled_loss(pos, neg, mask)) == pytest.approx(bce, rel=1e-12)
    bpr = (sp(1 - 2) + (sp(3 + 1) + sp(-2 + 1)) / 2) / 2
    assert float(bpr_loss(pos, neg, mask)) == pytest.approx(bpr, rel=1e-12)
    gb = ((0.5 * sp(-2) + sp(1)) + (0.5 * sp(1) + sp(3) + sp(-2))) / 2
    assert float(gbce_loss(pos, neg, mask, beta=0.5)) == pytest.approx(gb, rel=1e-12)
    torch.testing.assert_close(
        gbce_loss(pos, neg, mask, beta=1.0), bce_sampled_loss(pos, neg, mask)
    )
    # A row without valid negatives is left out of BPR's mean.
    none = torch.tensor([[False, False], [True, True]])
    assert float(bpr_loss(pos, neg, none)) == pytest.approx((sp(4) + sp(-1)) / 2, rel=1e-12)
    # gSASRec: beta = alpha (t (1 - 1/alpha) + 1/alpha) = 1 - t (1 - alpha).
    alpha = 256 / 3415
    assert gbce_beta(256, 3416, 0.75) == pytest.approx(1 - 0.75 * (1 - alpha))
    assert gbce_beta(256, 3416, 0.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="neg_mask"):
        bpr_loss(pos, neg, mask[:, :1])


def test_impression_bce_equals_torch():
    x = _rand(50, seed=30, scale=3.0)
    y = (torch.rand(50, generator=torch.Generator().manual_seed(0)) > 0.7).double()
    w = torch.rand(50, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(impression_bce_loss(x, y), F.binary_cross_entropy_with_logits(x, y))
    ref = (F.binary_cross_entropy_with_logits(x, y, reduction="none") * w).sum() / w.sum()
    torch.testing.assert_close(impression_bce_loss(x, y, w), ref)
    big = torch.tensor([1e4, -1e4, 1e4])
    assert torch.isfinite(impression_bce_loss(big, torch.tensor([0.0, 1.0, 1.0])))
    with pytest.raises(ValueError, match="labels"):
        impression_bce_loss(x, y * 2)
    sim = Similarity(SimilarityConfig(kind="cosine", temperature=0.5))
    u, v = _rand(50, 4, seed=31), _rand(50, 4, seed=32)
    module = build_loss(RetrievalLossConfig(kind="impression_bce"), 10, sim)
    assert isinstance(module, ImpressionBCELoss)
    torch.testing.assert_close(
        module(u, v, y), F.binary_cross_entropy_with_logits(F.cosine_similarity(u, v) / 0.5, y)
    )


@pytest.mark.parametrize("kind", ["bce", "bpr", "gbce"])
def test_binary_modules_use_the_same_negatives(kind):
    n, b, d = 30, 4, 3
    table, u = _rand(n, d, seed=33), _rand(b, d, seed=34)
    pos = torch.tensor([1, 1, 2, 3])
    neg_cfg = NegativeSamplerConfig(uniform=6, in_batch=True, logq="none")
    module = build_loss(RetrievalLossConfig(kind=kind, negatives=neg_cfg, gbce_t=0.5), n, DOT)
    assert isinstance(module, SampledBinaryLoss)
    got = module(u, pos, table[pos], lambda i: table[i], torch.Generator().manual_seed(5))
    uni = torch.randint(n, (6,), generator=torch.Generator().manual_seed(5))
    ids = torch.cat([pos, uni])
    neg_logits = u @ table[ids].T
    valid = ids[None, :] != pos[:, None]
    pos_logits = (u * table[pos]).sum(1)
    ref = {
        "bce": lambda: bce_sampled_loss(pos_logits, neg_logits, valid),
        "bpr": lambda: bpr_loss(pos_logits, neg_logits, valid),
        "gbce": lambda: gbce_loss(pos_logits, neg_logits, valid, beta=gbce_beta(9, n, 0.5)),
    }[kind]()
    torch.testing.assert_close(got, ref)


def test_loss_config_dispatch_and_validation():
    assert isinstance(build_loss(RetrievalLossConfig(), 10, DOT), SampledSoftmaxLoss)
    with pytest.raises(ValueError, match="logq='none'"):
        RetrievalLossConfig(kind="bpr")  # default negatives carry logQ3
    with pytest.raises(ValueError, match="kind"):
        RetrievalLossConfig(kind="hinge")
    with pytest.raises(ValueError, match="chunk_size"):
        RetrievalLossConfig(kind="full_softmax", chunk_size=0)
    with pytest.raises(ValueError, match="logq"):
        SampledBinaryLoss(NegativeSamplerConfig(), 10, DOT, kind="bce")


def test_second_backward_through_sampled_softmax_repeats_the_gradient():
    # the backward leaves the saved score buffer intact (it scales the small factors)
    table, u = _rand(10, 3, seed=35).requires_grad_(), _rand(4, 3, seed=36)
    pos = torch.tensor([1, 2, 3, 4])
    out = SampledSoftmaxLoss(NegativeSamplerConfig(in_batch=True, logq="none"), 10, DOT)(
        u, pos, table[pos]
    )
    out.backward(retain_graph=True)
    first = table.grad.clone()
    out.backward()
    # bitwise: the same backward on the same saved tensors, added to itself (x + x is exact)
    torch.testing.assert_close(table.grad, 2 * first, rtol=0, atol=0)
