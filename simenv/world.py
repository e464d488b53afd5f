"""The hidden truth: items and users drawn from a config and a seed.

Everything here is vectorised: a 1,000,000-item, 1,000,000-user world builds in seconds.
Models may read only :attr:`World.catalog` (the public item content); the rest is for the
environment, evaluation and oracles.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simenv import clock
from simenv.config import UserModelConfig, WorldConfig, check_range
from simenv.types import ItemCatalog

__all__ = ["World", "ItemTruth", "UserTruth"]

_CHUNK = 131_072  # rows per chunk for the few steps that make (N, W, T) temporaries


@dataclass(frozen=True, eq=False)
class ItemTruth:
    """Hidden per-item truth (arrays of length N).

    Attributes:
        latent: float32 (N, d) unit vectors ``z_i`` near the item's topic centroid.
        group: int64 group (language) of the item.
        topic: int64 topic.
        creator: int64 creator.
        quality: float32 standard-normal quality.
        popularity: float32 base popularity ``rank ** -s`` (Zipf), max 1.
        appeal: float32 ``quality_weight * quality + popularity_weight * centred log popularity``,
            filled in by the world for its user model.
        minutes: float32 item length in minutes.
        release_time: float32 day from which the item may be shown.
    """

    latent: np.ndarray
    group: np.ndarray
    topic: np.ndarray
    creator: np.ndarray
    quality: np.ndarray
    popularity: np.ndarray
    minutes: np.ndarray
    release_time: np.ndarray


@dataclass(frozen=True, eq=False)
class UserTruth:
    """Hidden per-user truth (arrays of length n_users).

    Attributes:
        preference: float32 (U, d) unit preference vector ``p_u`` (a mix of a few topics).
        group: int64 group; the user engages only with items of this group.
        topics: int64 (U, topics_per_user) the topics mixed into the preference.
        activity: float32 in (0, 1): how often the user comes back (scales return probability
            and session frequency).
        patience: float32 initial session budget.
    """

    preference: np.ndarray
    group: np.ndarray
    topics: np.ndarray
    activity: np.ndarray
    patience: np.ndarray


def _check_ids(name: str, ids: np.ndarray, n: int) -> np.ndarray:
    """Integer ids in ``[0, n)`` as int64, else ``ValueError`` naming ``name`` and the range."""
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must be integer ids, got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= n):
        raise ValueError(
            f"{name} must be in [0, {n - 1}], got values in [{ids.min()}, {ids.max()}]"
        )
    return ids.astype(np.int64, copy=False)


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


class World:
    """The simulator's hidden truth, made from a :class:`WorldConfig` and a seed.

    Items have a latent vector drawn around their topic's centroid, a group (disjoint groups,
    think languages), a topic, a creator (creators publish in a few topics of one group),
    quality, Zipf base popularity, a length, a release time (a share of items is released
    while the simulation runs), and public content that carries the latent signal: title tokens
    drawn from group- and topic-specific vocabularies (within a topic, the item's deviation from
    the centroid picks the words) plus noise tokens, and the categorical ids
    (creator, topic, group).

    Users have a group, a unit preference vector mixing a few topics, an activity level and a
    patience (initial session budget).

    Ground truth for evaluation and oracles only: :meth:`utility`, :meth:`affinity`,
    :meth:`best_items`.

    The items, users and vocabulary use independent random streams spawned from ``seed``, so
    changing ``n_users`` does not change the items.

    Example:
        >>> w = World(WorldConfig.small(), seed=0)
        >>> w.catalog.n_items, w.n_users
        (500, 300)
    """

    def __init__(
        self,
        config: WorldConfig | None = None,
        seed: int = 0,
        user_model: UserModelConfig | None = None,
    ) -> None:
        config = WorldConfig() if config is None else config
        if not isinstance(config, WorldConfig):
            raise ValueError(f"config must be a WorldConfig, got {config!r}")
        check_range("seed", seed, 0, 2**63 - 1, integer=True)
        self.config = config
        self.seed = int(seed)
        self.user_model = UserModelConfig() if user_model is None else user_model
        ss_topics, ss_items, ss_users, ss_titles = np.random.SeedSequence(self.seed).spawn(4)
        self.topic_centroids = self._make_topics(np.random.default_rng(ss_topics))
        self.items = self._make_items(np.random.default_rng(ss_items))
        self.users = self._make_users(np.random.default_rng(ss_users))
        title_tokens = self._make_titles(np.random.default_rng(ss_titles))
        cfg = config
        categorical = np.stack(
            [self.items.creator, self.items.topic, self.items.group], axis=1
        ).astype(np.int64)
        self.catalog = ItemCatalog(
            title_tokens=title_tokens,
            vocab_size=cfg.vocab_size,
            categorical=categorical,
            categorical_names=("creator", "topic", "group"),
            categorical_cardinalities=(cfg.n_creators, cfg.n_topics, cfg.n_groups),
            release_time=self.items.release_time,
        )
        um = self.user_model
        log_pop = np.log(self.items.popularity)
        self.item_appeal = (
            um.quality_weight * self.items.quality
            + um.popularity_weight * (log_pop - log_pop.mean())
        ).astype(np.float32)

    # ------------------------------------------------------------------ generation
    def _make_topics(self, rng: np.random.Generator) -> np.ndarray:
        c = self.config
        return _unit(rng.standard_normal((c.n_topics, c.latent_dim))).astype(np.float32)

    def _make_items(self, rng: np.random.Generator) -> ItemTruth:
        c = self.config
        n, d = c.n_items, c.latent_dim
        # Creators: a group each, a few topics each, Zipf-like productivity.
        creator_group = rng.integers(c.n_groups, size=c.n_creators)
        creator_topics = rng.integers(c.n_topics, size=(c.n_creators, c.topics_per_creator))
        creator_offset = rng.standard_normal((c.n_creators, d)) / np.sqrt(d)
        productivity = 1.0 / np.arange(1, c.n_creators + 1) ** 0.7
        productivity = rng.permutation(productivity)
        creator = rng.choice(c.n_creators, size=n, p=productivity / productivity.sum())
        group = creator_group[creator]
        topic = creator_topics[creator, rng.integers(c.topics_per_creator, size=n)]
        noise = rng.standard_normal((n, d)).astype(np.float32) / np.float32(np.sqrt(d))
        # z_i = unit(c_topic + spread * (0.5 * creator offset + item noise))
        latent = self.topic_centroids[topic] + np.float32(c.topic_spread) * (
            np.float32(0.5) * creator_offset[creator].astype(np.float32) + noise
        )
        latent = _unit(latent).astype(np.float32)
        quality = rng.standard_normal(n).astype(np.float32)
        popularity = (1.0 / (rng.permutation(n) + 1.0) ** c.popularity_exponent).astype(np.float32)
        minutes = rng.lognormal(np.log(c.mean_item_minutes) - 0.125, 0.5, size=n).astype(np.float32)
        release = -rng.uniform(0.0, c.catalog_age, size=n)
        is_new = rng.random(n) < c.new_item_fraction
        release[is_new] = rng.uniform(0.0, c.release_horizon, size=int(is_new.sum())) + 1e-3
        return ItemTruth(
            latent=latent,
            group=group.astype(np.int64),
            topic=topic.astype(np.int64),
            creator=creator.astype(np.int64),
            quality=quality,
            popularity=popularity,
            minutes=minutes,
            release_time=release.astype(np.float32),
        )

    def _make_users(self, rng: np.random.Generator) -> UserTruth:
        c = self.config
        u, d = c.n_users, c.latent_dim
        group = rng.integers(c.n_groups, size=u).astype(np.int64)
        topics = rng.integers(c.n_topics, size=(u, c.topics_per_user)).astype(np.int64)
        weights = rng.dirichlet(np.ones(c.topics_per_user), size=u).astype(np.float32)
        pref = np.einsum("uk,ukd->ud", weights, self.topic_centroids[topics])
        pref += (
            np.float32(c.user_spread)
            * rng.standard_normal((u, d)).astype(np.float32)
            / np.float32(np.sqrt(d))
        )
        pref = _unit(pref).astype(np.float32)
        activity = (0.3 + 0.7 * rng.beta(2.0, 2.0, size=u)).astype(np.float32)
        mp = self.user_model.mean_patience
        patience = rng.gamma(4.0, mp / 4.0, size=u).astype(np.float32) + np.float32(1.0)
        return UserTruth(
            preference=pref, group=group, topics=topics, activity=activity, patience=patience
        )

    def _make_titles(self, rng: np.random.Generator) -> np.ndarray:
        """Title tokens: (group, topic) words chosen by the item's deviation, group words, noise.

        Vocabulary layout: 0 = padding; then ``n_groups * n_topics * words_per_topic`` topic
        words (id ``1 + (g * n_topics + t) * W + j``); then ``words_per_group`` generic words per
        group; then ``noise_words`` shared noise words.
        """
        c = self.config
        n, t_len, w = c.n_items, c.title_length, c.words_per_topic
        word_dirs = _unit(rng.standard_normal((c.n_topics, w, c.latent_dim))).astype(np.float32)
        kind = rng.random((n, t_len))
        u_word = rng.random((n, t_len))
        group_word = rng.integers(c.words_per_group, size=(n, t_len))
        noise_word = rng.integers(c.noise_words, size=(n, t_len))
        tokens = np.empty((n, t_len), dtype=np.int64)
        topic_base = 1 + (self.items.group * c.n_topics + self.items.topic) * w  # (N,)
        group_base = 1 + c.n_groups * c.n_topics * w + self.items.group * c.words_per_group
        noise_base = 1 + c.n_groups * c.n_topics * w + c.n_groups * c.words_per_group
        for s in range(0, n, _CHUNK):
            e = min(n, s + _CHUNK)
            top = self.items.topic[s:e]
            resid = self.items.latent[s:e] - self.topic_centroids[top]  # (n, d)
            logits = c.title_sharpness * np.einsum("nd,nwd->nw", resid, word_dirs[top])  # (n, W)
            logits -= logits.max(axis=1, keepdims=True)
            cdf = np.cumsum(np.exp(logits), axis=1)
            cdf /= cdf[:, -1:]
            # inverse-CDF draw of a word per title position: (n, T)
            word = (cdf[:, None, :] < u_word[s:e, :, None]).sum(axis=2)
            word = np.minimum(word, w - 1)
            k = kind[s:e]
            tok = np.where(
                k < c.title_topic_share,
                topic_base[s:e, None] + word,
                np.where(
                    k < c.title_topic_share + c.title_group_share,
                    group_base[s:e, None] + group_word[s:e],
                    noise_base + noise_word[s:e],
                ),
            )
            tokens[s:e] = tok
        return tokens

    # ------------------------------------------------------------------ ground truth
    @property
    def n_items(self) -> int:
        """Catalog size."""
        return self.config.n_items

    @property
    def n_users(self) -> int:
        """User population size."""
        return self.config.n_users

    def _check_users(self, users: np.ndarray) -> np.ndarray:
        return _check_ids("users", users, self.n_users)

    def _check_items(self, items: np.ndarray) -> np.ndarray:
        return _check_ids("items", items, self.n_items)

    def utility(
        self,
        users: np.ndarray,
        items: np.ndarray,
        preference: np.ndarray | None = None,
    ) -> np.ndarray:
        """Static click utility ``alpha <p_u, z_i> + appeal_i``; ``-inf`` across groups.

        Args:
            users: int (B,) user ids.
            items: int (B, K) item ids per user, or (K,) shared by all users.
            preference: optional float (B, d) current preference vectors (after drift) to use
                instead of the users' initial ones.

        Returns:
            float32 (B, K). With ``cross_group_epsilon > 0`` other-group items get
            ``log(epsilon)`` added instead of ``-inf``.
        """
        users = self._check_users(users)
        items = self._check_items(items)
        pref = self.users.preference[users] if preference is None else preference
        if items.ndim == 1:
            z = self.items.latent[items]  # (K, d)
            match = pref @ z.T  # (B, K)
            same = self.users.group[users][:, None] == self.items.group[items][None, :]
            appeal = self.item_appeal[items][None, :]
        else:
            z = self.items.latent[items]  # (B, K, d)
            match = np.einsum("bkd,bd->bk", z, pref)
            same = self.users.group[users][:, None] == self.items.group[items]
            appeal = self.item_appeal[items]
        util = (self.user_model.affinity_scale * match + appeal).astype(np.float32)
        eps = self.config.cross_group_epsilon
        penalty = np.float32(np.log(eps)) if eps > 0 else np.float32(-np.inf)
        return np.where(same, util, util + penalty).astype(np.float32)

    def affinity(
        self,
        users: np.ndarray,
        items: np.ndarray,
        preference: np.ndarray | None = None,
    ) -> np.ndarray:
        """True affinity: the probability of a click on the item shown alone at the top.

        ``affinity = sigmoid(utility - u_0)``; exactly 0 for items of another group (unless
        ``cross_group_epsilon > 0``). Same shapes as :meth:`utility`.
        """
        util = self.utility(users, items, preference)
        with np.errstate(over="ignore"):
            return (1.0 / (1.0 + np.exp(self.user_model.no_click_utility - util))).astype(
                np.float32
            )

    def best_items(
        self,
        users: np.ndarray,
        k: int,
        time: float | np.ndarray | None = None,
        preference: np.ndarray | None = None,
        chunk: int = 65_536,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k items by true affinity over the whole catalog (oracle / evaluation only).

        Args:
            users: int (B,) user ids.
            k: number of items.
            time: if given (scalar or (B,)), only items released by then are eligible.
            preference: optional (B, d) current preferences.
            chunk: items scored per block (bounds memory at B x chunk).

        Returns:
            ``(items int64 (B, k), affinity float32 (B, k))`` sorted by decreasing affinity.
        """
        users = self._check_users(users)
        check_range("k", k, 1, self.n_items, integer=True)
        b = users.shape[0]
        pref = self.users.preference[users] if preference is None else preference
        best_s = np.full((b, 0), -np.inf, dtype=np.float32)
        best_i = np.zeros((b, 0), dtype=np.int64)
        t = None if time is None else np.broadcast_to(np.asarray(time, dtype=np.float64), (b,))
        for s in range(0, self.n_items, chunk):
            ids = np.arange(s, min(self.n_items, s + chunk))
            util = self.utility(users, ids, pref)
            if t is not None:
                ok = clock.released(self.items.release_time[ids][None, :], t[:, None])
                util = np.where(ok, util, -np.inf)
            cand_s = np.concatenate([best_s, util], axis=1)
            cand_i = np.concatenate([best_i, np.broadcast_to(ids, (b, ids.size))], axis=1)
            kk = min(k, cand_s.shape[1])
            part = np.argpartition(-cand_s, kk - 1, axis=1)[:, :kk]
            best_s = np.take_along_axis(cand_s, part, axis=1)
            best_i = np.take_along_axis(cand_i, part, axis=1)
        order = np.argsort(-best_s, axis=1, kind="stable")
        best_i = np.take_along_axis(best_i, order, axis=1)
        best_s = np.take_along_axis(best_s, order, axis=1)
        with np.errstate(over="ignore"):
            aff = 1.0 / (1.0 + np.exp(self.user_model.no_click_utility - best_s.astype(np.float64)))
        return best_i, aff.astype(np.float32)

    def released(self, time: float) -> np.ndarray:
        """Boolean (N,) mask of items released at ``time`` (:func:`simenv.clock.released`)."""
        return clock.released(self.items.release_time, time)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"World(n_items={c.n_items}, n_users={c.n_users}, n_groups={c.n_groups}, "
            f"n_topics={c.n_topics}, latent_dim={c.latent_dim}, seed={self.seed})"
        )
