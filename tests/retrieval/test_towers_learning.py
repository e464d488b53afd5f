"""Small learning tests: the towers learn what their inductive bias allows, and no more.

1. Next-item rule that depends on event order: a transformer user tower learns it, mean
   pooling (order-blind) cannot beat 50%.
2. Content item towers encode items never seen in training: held-out items of a topic rank
   above other held-out items; an ID tower cannot do it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from retrieval.towers import (
    BagOfWordsItemTower,
    FeatureItemTower,
    IDItemTower,
    ItemTower,
    MeanPoolUserTower,
    TransformerUserTower,
    UserTower,
)
from simenv.types import ItemCatalog


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


N_SEQ_ITEMS, SEQ_LEN = 30, 4


def order_batch(batch: int, g: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Random histories; the next item is the second most recent one (a, then b -> a)."""
    items = torch.randint(0, N_SEQ_ITEMS, (batch, SEQ_LEN), generator=g)
    # make the last two distinct, so that the rule depends on their order
    shift = torch.randint(1, N_SEQ_ITEMS, (batch,), generator=g)
    items[:, -1] = (items[:, -2] + shift) % N_SEQ_ITEMS
    history = {"item_ids": items, "mask": torch.ones(batch, SEQ_LEN, dtype=torch.int8)}
    return history, items[:, -2]


def train_next_item(user: UserTower, items: ItemTower, steps: int, seed: int) -> float:
    """Full-softmax next-item training; returns accuracy on fresh histories."""
    g = torch.Generator().manual_seed(seed)
    params = torch.nn.ModuleList([user, items]).parameters()  # shared weights once
    opt = torch.optim.Adam(params, lr=3e-3)
    all_ids = torch.arange(items.n_items)
    for _ in range(steps):
        history, target = order_batch(128, g)
        logits = user(history) @ items(all_ids).T  # (B, N): full softmax over the catalog
        loss = F.cross_entropy(logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    user.eval()
    with torch.no_grad():
        history, target = order_batch(2000, g)
        pred = (user(history) @ items(all_ids).T).argmax(-1)
    return (pred == target).float().mean().item()


def test_transformer_learns_an_order_rule_that_mean_pooling_cannot():
    items = IDItemTower(N_SEQ_ITEMS, 32, seed=0)
    transformer = TransformerUserTower(
        items, 32, n_layers=2, n_heads=2, max_len=SEQ_LEN, use_event_type=False, use_context=False
    )
    acc_transformer = train_next_item(transformer, items, steps=300, seed=1)
    items = IDItemTower(N_SEQ_ITEMS, 32, seed=0)
    mean = MeanPoolUserTower(items, last_n=2, mlp_hidden=(64,))
    acc_mean = train_next_item(mean, items, steps=300, seed=1)
    assert acc_transformer > 0.9, acc_transformer
    # mean pooling sees the set {a, b} only: at best a coin flip between a and b
    assert acc_mean < 0.56, acc_mean


N_TOPICS, N_CONTENT_ITEMS = 6, 360


def topic_catalog(seed: int = 0) -> ItemCatalog:
    """Titles use mostly tokens of the item's topic; creators each write in one topic."""
    rng = np.random.default_rng(seed)
    topic = rng.integers(0, N_TOPICS, N_CONTENT_ITEMS)
    creator = rng.integers(0, 5, N_CONTENT_ITEMS) * N_TOPICS + topic  # 30 creators
    words = 1 + topic[:, None] * 8 + rng.integers(0, 8, (N_CONTENT_ITEMS, 3))  # topic words
    noise = 1 + N_TOPICS * 8 + rng.integers(0, 20, (N_CONTENT_ITEMS, 2))  # shared words
    tokens = np.concatenate([words, noise, np.zeros((N_CONTENT_ITEMS, 1), np.int64)], axis=1)
    cat = np.stack([creator, topic, rng.integers(0, 2, N_CONTENT_ITEMS)], axis=1)
    return ItemCatalog(
        title_tokens=tokens,
        vocab_size=1 + N_TOPICS * 8 + 20,
        categorical=cat,
        categorical_names=("creator", "topic", "group"),
        categorical_cardinalities=(5 * N_TOPICS, N_TOPICS, 2),
        release_time=np.zeros(N_CONTENT_ITEMS, np.float32),
    )


def heldout_topic_auc(tower: ItemTower, topic: np.ndarray, steps: int = 150) -> float:
    """Train on 70% of the items (a topic query must retrieve its items), score the rest.

    Returns the mean over topics of the AUC of "held-out item has this topic" under the
    topic query's scores.
    """
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(topic))
    train, held = torch.as_tensor(perm[: int(0.7 * len(topic))]), perm[int(0.7 * len(topic)) :]
    topic_t = torch.as_tensor(topic)
    query = torch.nn.Embedding(N_TOPICS, tower.dim)
    query.weight.data.normal_(0, tower.dim**-0.5, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(list(tower.parameters()) + list(query.parameters()), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        pos = torch.randint(0, len(train), (128,), generator=g)  # index into train
        logits = query(topic_t[train[pos]]) @ tower(train).T  # (B, n_train)
        loss = F.cross_entropy(logits, pos)  # the positive is one item of the query's topic
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        scores = (query.weight @ tower(torch.as_tensor(held)).T).numpy()  # (topics, n_held)
    aucs = []
    for t in range(N_TOPICS):
        pos_s, neg_s = scores[t, topic[held] == t], scores[t, topic[held] != t]
        aucs.append((pos_s[:, None] > neg_s[None, :]).mean())
    return float(np.mean(aucs))


def test_content_towers_rank_unseen_items_of_the_right_topic_first():
    catalog = topic_catalog()
    topic = catalog.column("topic")
    bow = heldout_topic_auc(BagOfWordsItemTower(catalog, 16), topic)
    # creators, not the topic column itself: generalisation through a shared feature
    features = heldout_topic_auc(
        FeatureItemTower(catalog, 16, hidden=(32,), features=("creator", "group")), topic
    )
    ids = heldout_topic_auc(IDItemTower(catalog.n_items, 16), topic)
    assert bow > 0.95, bow
    assert features > 0.95, features
    assert ids < 0.7, ids  # held-out ID vectors never got a gradient: chance level
