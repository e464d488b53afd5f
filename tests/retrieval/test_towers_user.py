"""User towers: shapes, padding, causality, pooling, time decay, rotary, empty users, configs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from retrieval.towers import (
    GRUUserTower,
    IDItemTower,
    MeanPoolUserTower,
    TransformerUserTower,
    UserTower,
    UserTowerConfig,
    build_user_tower,
    time_bucket,
)
from retrieval.towers._layers import RotaryEmbedding

N_ITEMS = 50
DIM = 16


def make_history(batch=6, length=8, seed=0, lengths=None):
    """Left-padded histories; row lengths default to 0 (empty), L (full) and random."""
    rng = np.random.default_rng(seed)
    if lengths is None:
        lengths = np.concatenate([[0, length], rng.integers(1, length + 1, batch - 2)])
    lengths = np.asarray(lengths)
    mask = (np.arange(length)[None, :] >= length - lengths[:, None]).astype(np.int8)
    items = rng.integers(0, N_ITEMS, (len(lengths), length)) * mask
    events = rng.integers(1, 4, (len(lengths), length)) * mask
    dt = np.sort(rng.exponential(3.0, (len(lengths), length)), axis=1)[:, ::-1] * mask
    context = np.stack(
        [
            rng.uniform(0, 30, len(lengths)),
            rng.integers(0, 9, len(lengths)),
            rng.integers(0, 20, len(lengths)),
        ],
        axis=1,
    )
    return {
        "item_ids": torch.as_tensor(items, dtype=torch.int64),
        "events": torch.as_tensor(events, dtype=torch.int64),
        "dt": torch.as_tensor(dt.copy(), dtype=torch.float32),
        "mask": torch.as_tensor(mask),
        "context": torch.as_tensor(context, dtype=torch.float32),
        "user": torch.arange(len(lengths)),
    }


def item_tower(seed=0):
    return IDItemTower(N_ITEMS, DIM, seed=seed)


def transformer(**kw):
    kw.setdefault("max_len", 12)
    kw.setdefault("n_heads", 2)
    return TransformerUserTower(item_tower(), DIM, **kw).eval()


ALL_CONFIGS = [
    UserTowerConfig(kind="mean"),
    UserTowerConfig(kind="mean", last_n=3, time_decay_half_life=2.0, mlp_hidden=(8,)),
    UserTowerConfig(kind="transformer", max_len=12),
    UserTowerConfig(kind="transformer", max_len=12, positional="rotary", pooling="cls"),
    UserTowerConfig(kind="transformer", max_len=12, causal=False, pooling="mean", n_layers=1),
    UserTowerConfig(
        kind="transformer",
        max_len=12,
        use_event_type=False,
        use_context=False,
        share_item_tower=False,
    ),
    UserTowerConfig(kind="gru", n_layers=2),
    UserTowerConfig(kind="gru", use_context=False, share_item_tower=False),
]


def cfg_id(c):
    return f"{c.kind}-{c.positional}-{c.pooling}-{c.causal}-{c.share_item_tower}"


def scramble_padding(history, seed=1):
    """Random garbage in every padded slot (items, events, dt); real slots untouched."""
    g = torch.Generator().manual_seed(seed)
    pad = history["mask"] == 0
    out = dict(history)
    out["item_ids"] = torch.where(
        pad, torch.randint(0, N_ITEMS, pad.shape, generator=g), history["item_ids"]
    )
    out["events"] = torch.where(pad, torch.randint(0, 4, pad.shape, generator=g), history["events"])
    out["dt"] = torch.where(pad, torch.rand(pad.shape, generator=g) * 100, history["dt"])
    return out


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=cfg_id)
def test_shapes_dtypes_padding_invariance_and_empty_users(config):
    tower = build_user_tower(config, item_tower()).eval()
    h = make_history()
    out = tower(h)
    assert out.shape == (6, DIM) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # row 0 has an empty history: it gets exactly the learned empty vector (bitwise: a
    # torch.where selects it, no arithmetic)
    torch.testing.assert_close(out[0], tower.empty.detach(), rtol=0, atol=0)
    # numpy input works the same (bitwise: the same tensors on the same shapes, a rerun)
    np_out = tower({k: v.numpy() for k, v in h.items()})
    torch.testing.assert_close(np_out, out, rtol=0, atol=0)
    # padding invariance: garbage in padded slots changes nothing
    torch.testing.assert_close(tower(scramble_padding(h)), out, rtol=1e-5, atol=1e-6)
    if hasattr(tower, "forward_sequence"):
        seq = tower.forward_sequence(h)
        assert seq.shape == (6, 8, DIM)
        torch.testing.assert_close(
            tower.forward_sequence(scramble_padding(h)), seq, rtol=1e-5, atol=1e-6
        )
        assert torch.count_nonzero(seq[h["mask"] == 0]) == 0
    # padding-length invariance: the same events padded to a longer L give the same vectors
    longer = {
        k: (
            torch.cat([torch.zeros(6, 4, dtype=v.dtype), v], dim=1)
            if v.ndim == 2 and k != "context"
            else v
        )
        for k, v in h.items()
    }
    torch.testing.assert_close(tower(longer), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=cfg_id)
def test_all_empty_batch_is_finite_with_finite_gradients(config):
    tower = build_user_tower(config, item_tower()).train()
    h = make_history(batch=3, lengths=[0, 0, 0])
    out = tower(h)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, tower.empty.expand(3, -1), rtol=0, atol=0)  # a select
    if hasattr(tower, "forward_sequence"):
        assert torch.isfinite(tower.forward_sequence(h)).all()
    # mixed batch, backward: no NaN gradient anywhere
    h = make_history(seed=4)
    (tower(h) ** 2).sum().backward()
    for name, p in tower.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    assert tower.empty.grad is not None and tower.empty.grad.abs().sum() > 0


@pytest.mark.parametrize("positional", ["learned", "rotary"])
def test_causal_mask(positional):
    h = make_history(batch=3, length=8, lengths=[8, 8, 6], seed=2)
    t = 5
    changed = dict(h)
    changed["item_ids"] = h["item_ids"].clone()
    changed["item_ids"][:, t] = (h["item_ids"][:, t] + 1) % N_ITEMS
    causal = transformer(positional=positional, causal=True)
    a, b = causal.forward_sequence(h), causal.forward_sequence(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)  # the past ignores the future
    assert ((a[:, t:] - b[:, t:]).abs().amax(-1) > 1e-4).all()  # t and later see the change
    bidirectional = transformer(positional=positional, causal=False)
    a, b = bidirectional.forward_sequence(h), bidirectional.forward_sequence(changed)
    assert ((a[:, 2:t] - b[:, 2:t]).abs().amax(-1) > 1e-4).all()  # earlier positions see it too


def test_pooling_variants():
    h = make_history(seed=3, lengths=[0, 8, 2, 5, 3, 7])  # >= 2 events: last != mean
    real = h["mask"].bool()
    last = transformer(pooling="last", causal=False, seed=7)
    mean = transformer(pooling="mean", causal=False, seed=7)
    cls = transformer(pooling="cls", causal=False, seed=7)
    seq = last.forward_sequence(h)
    # last and mean towers have identical weights: same sequence outputs (bitwise: the same
    # computation on the same shapes; pooling only comes after forward_sequence)
    torch.testing.assert_close(mean.forward_sequence(h), seq, rtol=0, atol=0)
    out_last, out_mean, out_cls = last(h), mean(h), cls(h)
    torch.testing.assert_close(
        out_last[1:], seq[1:, -1], rtol=1e-5, atol=1e-6
    )  # one-query last block
    m = real.unsqueeze(-1).float()
    torch.testing.assert_close(
        out_mean[1:], ((seq * m).sum(1) / m.sum(1))[1:], rtol=1e-5, atol=1e-6
    )
    for a, b in [(out_last, out_mean), (out_last, out_cls), (out_mean, out_cls)]:
        assert ((a[2:] - b[2:]).abs().amax(-1) > 1e-3).all()
    # causal + CLS: the CLS token sits after the history, so it sees every event
    causal_cls = transformer(pooling="cls", causal=True, seed=7)
    changed = dict(h)
    changed["item_ids"] = h["item_ids"].clone()
    changed["item_ids"][:, 0] = (
        h["item_ids"][:, 0] + 1
    ) % N_ITEMS  # oldest slot (real in full row 1)
    assert (causal_cls(changed)[1] - causal_cls(h)[1]).abs().max() > 1e-4


@pytest.mark.parametrize("positional", ["learned", "rotary"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pooling", ["last", "cls"])
@pytest.mark.parametrize("n_layers", [1, 3])
def test_one_query_last_block_matches_the_full_run(positional, causal, pooling, n_layers):
    """forward() computes only the pooled token in the last block; it must equal the output of
    the full sequence run at that token."""
    tower = transformer(positional=positional, causal=causal, pooling=pooling, n_layers=n_layers)
    h = make_history(seed=9)
    full = tower._run(tower._history(h))  # (B, S, d)
    expected = full[:, -1]  # last slot (left padding) or the CLS token after it
    torch.testing.assert_close(tower(h)[1:], expected[1:], rtol=1e-5, atol=1e-6)


def test_last_pooling_uses_most_recent_real_event_on_any_mask_layout():
    tower = transformer(pooling="last", causal=True)
    h = make_history(batch=2, length=6, lengths=[6, 6])
    right_padded = dict(h)
    right_padded["mask"] = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.int8)
    out = tower(right_padded)
    seq = tower.forward_sequence(right_padded)
    torch.testing.assert_close(out[0], seq[0, 3], rtol=1e-5, atol=1e-6)


def test_mean_pool_time_decay_and_last_n_hand_case():
    it = item_tower()
    h = {
        "item_ids": torch.tensor([[0, 3, 4, 5, 6], [0, 0, 0, 7, 8], [1, 2, 3, 4, 5]]),
        "mask": torch.tensor([[0, 1, 1, 1, 1], [0, 0, 0, 1, 1], [0, 0, 0, 0, 0]]),
        "dt": torch.tensor([[0.0, 4.0, 2.0, 1.0, 0.0], [0, 0, 0, 1e6 + 2.0, 1e6], [0.0] * 5]),
    }
    tower = MeanPoolUserTower(it, time_decay_half_life=2.0)
    w = tower.pooling_weights(h)
    raw = torch.tensor([0.0, 0.5**2, 0.5**1, 0.5**0.5, 1.0])  # 0.5 ** (dt / half_life)
    torch.testing.assert_close(w[0], raw / raw.sum(), rtol=1e-6, atol=1e-7)
    # huge dt: 0.5 ** 500000 underflows, yet the ratio 1 : 2 survives (log-space weights)
    torch.testing.assert_close(w[1], torch.tensor([0, 0, 0, 1 / 3, 2 / 3]), rtol=1e-5, atol=1e-7)
    assert torch.count_nonzero(w[2]) == 0  # empty history
    # last n = 2 keeps the two most recent events, decay renormalised over them
    w2 = MeanPoolUserTower(it, last_n=2, time_decay_half_life=2.0).pooling_weights(h)
    torch.testing.assert_close(w2[0], torch.tensor([0, 0, 0, 0.5**0.5, 1.0]) / (1 + 0.5**0.5))
    # no decay, last 3: plain average of the last three items
    plain = MeanPoolUserTower(it, last_n=3)
    vec = it.embedding.weight.detach()
    torch.testing.assert_close(plain(h)[0], vec[[4, 5, 6]].mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(plain(h)[1], vec[[7, 8]].mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        tower(h)[0], (w[0, 1:, None] * vec[[3, 4, 5, 6]]).sum(0), rtol=1e-6, atol=1e-6
    )


def test_rotary_hand_check_and_relative_positions():
    rot = RotaryEmbedding(head_dim=4, max_positions=64, base=100.0)
    # channel pairs (0, 2) and (1, 3) turn by p * 1 and p * 100 ** (-1/2) = p / 10
    x = torch.tensor([[1.0, 0.0, 0.0, 2.0]])
    p = 3
    y = rot(x, torch.tensor([p]))
    c0, s0, c1, s1 = math.cos(p), math.sin(p), math.cos(p / 10), math.sin(p / 10)
    expected = torch.tensor([[1 * c0 - 0 * s0, 0 * c1 - 2 * s1, 0 * c0 + 1 * s0, 2 * c1 + 0 * s1]])
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    assert torch.allclose(y.norm(), x.norm())  # a rotation keeps the norm
    # scores depend only on the relative position m - n
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, generator=g), torch.randn(1, 4, generator=g)

    def score(m, n):
        return (rot(q, torch.tensor([m])) * rot(k, torch.tensor([n]))).sum().item()

    for m, n, s in [(5, 2, 10), (0, 7, 30), (12, 12, 40)]:
        assert score(m, n) == pytest.approx(score(m + s, n + s), rel=1e-5, abs=1e-5)
    assert score(9, 4) == pytest.approx(score(5, 0), rel=1e-5)  # = <R_{m-n} q, k>
    assert abs(score(5, 2) - score(5, 3)) > 1e-3  # but they do depend on the offset
    with pytest.raises(ValueError, match="even head dimension"):
        RotaryEmbedding(head_dim=3, max_positions=4)


def test_time_bucket():
    dt_days = torch.tensor([-1.0, 0.0, 1 / 1440, 3 / 1440, 1.0, 1e9])
    # floor(log2(1 + minutes)): 0, 0, 1, 2, floor(log2(1441)) = 10, clipped to 23
    assert time_bucket(dt_days).tolist() == [0, 0, 1, 2, 10, 23]


def test_context_inputs():
    h = make_history(seed=5)
    tower = transformer(use_context=True)
    out = tower(h)
    moved = dict(h)
    moved["dt"] = h["dt"] * 100 + 1  # every real event much older
    assert (tower(moved)[1:] - out[1:]).abs().amax() > 1e-3
    # the request-context projection starts at zero, so context has no effect at init ...
    # (bitwise: zero weights give exact zeros, and x + 0 == x)
    other = dict(h)
    other["context"] = h["context"] + torch.tensor([0.3, 4.0, 7.0])
    torch.testing.assert_close(tower(other), out, rtol=0, atol=0)
    # ... and does once trained
    with torch.no_grad():
        tower.inputs.request.weight.normal_(generator=torch.Generator().manual_seed(0))
    assert (tower(other)[1:] - tower(h)[1:]).abs().amax() > 1e-3
    # without context / event types, those keys are not needed
    bare = transformer(use_context=False, use_event_type=False)
    assert bare({"item_ids": h["item_ids"], "mask": h["mask"]}).shape == (6, DIM)


def test_gru_matches_a_plain_run_on_the_real_events():
    tower = GRUUserTower(item_tower(), DIM, n_layers=2, use_context=False).eval()
    h = make_history(seed=6)
    out, seq = tower(h), tower.forward_sequence(h)
    with torch.no_grad():
        for b in range(1, 6):  # test-side reference loop
            real = h["mask"][b].bool()
            x = tower.inputs.item_proj(tower.item_encoder(h["item_ids"][b, real]))
            x = x + tower.inputs.event(h["events"][b, real])
            ref_seq, ref_last = tower.gru(x.unsqueeze(0))
            torch.testing.assert_close(out[b], tower.out(ref_last[-1, 0]), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(seq[b, real], tower.out(ref_seq[0]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1:], seq[1:, -1], rtol=1e-5, atol=1e-6)


def test_shared_and_own_item_encoder():
    it = item_tower()
    shared = build_user_tower(UserTowerConfig(kind="transformer", max_len=8), it)
    assert shared.item_encoder is it
    shared(make_history()).sum().backward()
    assert it.embedding.weight.grad is not None and it.embedding.weight.grad.abs().sum() > 0
    own = build_user_tower(
        UserTowerConfig(kind="transformer", max_len=8, share_item_tower=False), it
    )
    assert own.item_encoder is not it and isinstance(own.item_encoder, IDItemTower)
    assert own.item_encoder.n_items == it.n_items and own.item_encoder.dim == it.dim
    assert not torch.equal(own.item_encoder.embedding.weight, it.embedding.weight)
    assert own.get_config().share_item_tower is False
    # building a user tower never re-initialises the shared item tower
    before = it.embedding.weight.detach().clone()
    build_user_tower(UserTowerConfig(kind="gru"), it)
    assert torch.equal(it.embedding.weight, before)


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=cfg_id)
def test_seeded_construction_and_config_round_trip(config):
    h = make_history()
    rng_before = torch.get_rng_state()
    a = build_user_tower(config, item_tower()).eval()
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is never touched
    b = build_user_tower(config, item_tower()).eval()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    torch.testing.assert_close(a(h), b(h), rtol=0, atol=0)  # same seed, same batch: a rerun
    d = config.to_dict()
    d["seed"] = config.seed + 1
    c = build_user_tower(UserTowerConfig.from_dict(d), item_tower()).eval()
    assert not torch.allclose(a(h), c(h))
    cfg = a.get_config()
    assert cfg.dim == DIM and cfg.kind == config.kind
    assert UserTowerConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    rebuilt = UserTower.from_config(cfg, item_tower())
    assert type(rebuilt) is type(a) and rebuilt.get_config() == cfg
    torch.testing.assert_close(rebuilt.eval()(h), a(h), rtol=0, atol=0)  # a rerun


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "lstm"}, "kind must be one of"),
        ({"dim": 0}, "dim must be a positive int"),
        ({"last_n": 0}, "last_n must be a positive int"),
        ({"time_decay_half_life": 0.0}, "time_decay_half_life must be a finite number > 0"),
        ({"time_decay_half_life": float("inf")}, "time_decay_half_life"),
        ({"positional": "alibi"}, "positional must be one of"),
        ({"pooling": "max"}, "pooling must be one of"),
        ({"dropout": 1.0}, r"dropout must lie in \[0, 1\), got 1.0"),
        ({"dim": 10, "n_heads": 3}, "dim=10 must be divisible by n_heads=3"),
        ({"dim": 6, "n_heads": 2, "positional": "rotary"}, "even head dimension"),
        ({"n_layers": 0}, "n_layers"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UserTowerConfig(**kwargs)


def test_input_validation():
    tower = transformer(max_len=6)
    h = make_history(length=8)
    with pytest.raises(ValueError, match="history length L=8 exceeds max_len=6"):
        tower(h)
    h = make_history(length=6)
    with pytest.raises(ValueError, match=r"history lacks keys \['context'\]"):
        tower({k: v for k, v in h.items() if k != "context"})
    with pytest.raises(ValueError, match="must be int64"):
        tower({**h, "item_ids": h["item_ids"].int()})
    with pytest.raises(ValueError, match=r"history\['events'\] must lie in \[0, 4\), got \[0, 9\]"):
        tower({**h, "events": h["events"] * 0 + 9 * h["mask"]})
    with pytest.raises(ValueError, match=r"history\['mask'\] must have shape \(6, 6\)"):
        tower({**h, "mask": h["mask"][:, :3]})
    with pytest.raises(ValueError, match=r"history\['context'\] must have shape \(6, 3\)"):
        tower({**h, "context": h["context"][:, :2]})
    with pytest.raises(ValueError, match=r"history\['dt'\] must be finite"):
        tower({**h, "dt": h["dt"] + float("nan")})
    with pytest.raises(ValueError, match="config.dim=8 must equal item_tower.dim=16"):
        build_user_tower(UserTowerConfig(dim=8), item_tower())
    with pytest.raises(ValueError, match="item_encoder must be an ItemTower"):
        MeanPoolUserTower(torch.nn.Embedding(3, 4))


def test_rotary_tower_sees_order():
    """Without rotary (and no other position signal) a bidirectional mean-pooled transformer is
    permutation invariant; with rotary, swapping two events changes the user vector."""
    h = make_history(batch=2, length=6, lengths=[6, 6], seed=8)
    swapped = dict(h)
    swapped["item_ids"] = h["item_ids"][:, [0, 1, 2, 4, 3, 5]]
    swapped["events"] = h["events"][:, [0, 1, 2, 4, 3, 5]]
    kw = {"causal": False, "pooling": "mean", "use_context": False, "max_len": 6}
    rotary = transformer(positional="rotary", **kw)
    assert (rotary(h) - rotary(swapped)).abs().max() > 1e-4
    no_position = transformer(positional="rotary", **kw)
    no_position.rotary = None  # the same network with the rotation removed
    torch.testing.assert_close(no_position(h), no_position(swapped), rtol=1e-5, atol=1e-6)
