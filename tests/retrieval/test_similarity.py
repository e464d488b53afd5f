import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retrieval.losses import full_softmax_loss
from retrieval.similarity import Similarity, SimilarityConfig, norm_popularity_correlation


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kind": "l2"}, "kind"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"tau_min": 0.0}, "tau_min"),
        ({"tau_min": 1.0, "tau_max": 1.0}, "tau_max"),
        ({"learnable_temperature": True, "temperature": 0.5}, "init_log_tau instead"),
        ({"learnable_temperature": True, "temperature": None, "init_log_tau": 5.0}, "init_log_tau"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SimilarityConfig(**kwargs)


def test_dot_and_cosine_scores_match_formulas():
    u, v = _rand(5, 4, seed=1), _rand(7, 4, seed=2)
    dot = Similarity(SimilarityConfig(kind="dot", temperature=0.5)).double()
    torch.testing.assert_close(dot(u, v), u @ v.T / 0.5)
    cos = Similarity(SimilarityConfig(kind="cosine", temperature=0.05))
    expected = F.cosine_similarity(u[:, None, :], v[None, :, :], dim=-1) / 0.05
    torch.testing.assert_close(cos(u, v), expected)
    none = Similarity(SimilarityConfig(kind="dot", temperature=None))
    torch.testing.assert_close(none(u, v), u @ v.T)


@pytest.mark.parametrize("kind", ["dot", "cosine"])
def test_paired_and_batched_agree_with_forward(kind):
    sim = Similarity(SimilarityConfig(kind=kind, temperature=0.3))
    u, v = _rand(6, 3, seed=3), _rand(6, 3, seed=4)
    full = sim(u, v)
    torch.testing.assert_close(sim.paired(u, v), torch.diagonal(full))
    items = _rand(6, 5, 3, seed=5)
    batched = sim.batched(u, items)
    for b in range(6):
        torch.testing.assert_close(batched[b], sim(u[b : b + 1], items[b])[0])


def test_shape_errors_name_the_argument():
    sim = Similarity()
    with pytest.raises(ValueError, match="items"):
        sim(torch.zeros(2, 3), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="user"):
        sim(torch.zeros(3), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="items"):
        sim.paired(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="items"):
        sim.batched(torch.zeros(2, 3), torch.zeros(3, 4, 3))


def test_learnable_temperature_is_clipped_exp_initialised_at_one():
    sim = Similarity(SimilarityConfig(kind="cosine", learnable_temperature=True, temperature=None))
    assert float(sim.tau.detach()) == 1.0  # s = 0
    assert sim.log_tau.requires_grad
    with torch.no_grad():
        sim.log_tau.fill_(10.0)
    assert float(sim.tau.detach()) == pytest.approx(100.0)
    with torch.no_grad():
        sim.log_tau.fill_(-10.0)
    assert float(sim.tau.detach()) == pytest.approx(0.01)
    # Clipped: no gradient reaches s.
    sim(_rand(2, 3).float(), _rand(4, 3).float()).sum().backward()
    assert float(sim.log_tau.grad) == 0.0
    fixed = Similarity(SimilarityConfig(temperature=0.2))
    assert list(fixed.parameters()) == []


@pytest.mark.parametrize("chunk_size", [10_000, 7])
@pytest.mark.parametrize("log_tau", [0.0, math.log(0.2)])
def test_temperature_gradient_matches_lecture_formula(chunk_size, log_tau):
    # Lecture: with gamma = 1/tau, dL/dgamma = -cos(u, p) + E_{d ~ P(d|u)} cos(u, d), and
    # tau = exp(s) inside the clip, so dL/ds = -gamma * dL/dgamma.
    n, b, d = 50, 6, 5
    sim = Similarity(
        SimilarityConfig(
            kind="cosine", learnable_temperature=True, temperature=None, init_log_tau=log_tau
        )
    ).double()
    u, items = _rand(b, d, seed=6), _rand(n, d, seed=7)
    pos = torch.tensor([0, 3, 3, 10, 49, 20])
    loss = full_softmax_loss(u, pos, items, sim, chunk_size=chunk_size)
    loss.backward()
    cos = F.normalize(u, dim=-1) @ F.normalize(items, dim=-1).T  # (B, N)
    gamma = float(sim.gamma.detach())  # exp(-s), s stored at the parameter's precision
    assert gamma == pytest.approx(math.exp(-log_tau), rel=1e-6)
    p = torch.softmax(gamma * cos, dim=1)
    dl_dgamma = (-cos.gather(1, pos[:, None])[:, 0] + (p * cos).sum(1)).mean()
    assert float(sim.log_tau.grad) == pytest.approx(float(-gamma * dl_dgamma), rel=1e-9)


def test_temperature_gradient_sign():
    # cos(u, p) above its expectation -> dL/dgamma < 0 -> descent raises gamma (tau falls).
    sim = Similarity(
        SimilarityConfig(kind="cosine", learnable_temperature=True, temperature=None)
    ).double()
    items = torch.eye(4, dtype=torch.float64)
    u = torch.tensor([[1.0, 0.2, 0.1, 0.0]], dtype=torch.float64)
    full_softmax_loss(u, torch.tensor([0]), items, sim).backward()
    assert float(sim.log_tau.grad) > 0  # dL/ds > 0: s goes down, tau goes down
    sim.zero_grad()
    full_softmax_loss(u, torch.tensor([3]), items, sim).backward()  # worst item as positive
    assert float(sim.log_tau.grad) < 0


def test_dot_product_norm_gradient_formula():
    # Lecture: d L_softmax / d||p|| = -cos(u, p) ||u|| [1 - P(p | u)].
    sim = Similarity(SimilarityConfig(kind="dot", temperature=None))
    u = _rand(1, 4, seed=8)
    items = _rand(9, 4, seed=9)
    direction = F.normalize(items[2], dim=0)
    r = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    table = torch.cat([items[:2], (r * direction)[None], items[3:]])
    full_softmax_loss(u, torch.tensor([2]), table, sim).backward()
    with torch.no_grad():
        cos = float(F.cosine_similarity(u[0], direction, dim=0))
        prob = float(torch.softmax(u @ table.T, 1)[0, 2])
    assert float(r.grad) == pytest.approx(-cos * float(u.norm()) * (1 - prob), rel=1e-9)


def test_norm_popularity_correlation():
    rng = np.random.default_rng(0)
    pop = rng.random(100)
    dirs = rng.normal(size=(100, 8))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    assert norm_popularity_correlation(dirs * (1 + pop)[:, None], pop) == pytest.approx(1.0)
    assert norm_popularity_correlation(torch.tensor(dirs / (1 + pop)[:, None]), pop) == (
        pytest.approx(-1.0)
    )
    assert math.isnan(norm_popularity_correlation(dirs, pop))  # normalised: undefined
    noise = norm_popularity_correlation(dirs * rng.random(100)[:, None], pop)
    assert abs(noise) < 0.3
    with pytest.raises(ValueError, match="popularity"):
        norm_popularity_correlation(dirs, pop[:5])
