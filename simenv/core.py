"""The batched simulation core shared by :class:`RecEnv` (B = 1) and :class:`BatchedRecEnv`.

One :class:`Simulator` holds the state of ``B`` user slots as numpy arrays and steps them all
at once. Both environments drive the same core, so a ``BatchedRecEnv`` with one slot follows
exactly the trajectory of a ``RecEnv`` with the same seed.

Randomness: common random numbers. Every random draw is a counter-based hash of (env seed,
user id, that user's episode number, step in the episode, draw index) (:mod:`simenv.streams`),
so a user's draws do not depend on the other users, on B, or on the order users start in:
two agents that act identically on a user see identical outcomes for that user.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import special

from simenv.clock import format_time, observed_time, released
from simenv.config import EnvConfig
from simenv.streams import (
    exponential_from_uniform,
    normal_from_uniforms,
    occurrence_index,
    slot_keys,
    step_uniforms,
    stream_keys,
    uniforms,
)
from simenv.types import EventType, Obs
from simenv.users import choose, position_bias, respond, slate_utilities, step_reward
from simenv.world import World

__all__ = ["Simulator", "StepResult", "StepDraws"]

_MIN_PER_DAY = 1440.0


@dataclass
class StepResult:
    """What one batched step produced (arrays over the B slots).

    ``chosen`` is the slate position clicked (-1 none); ``event``/``watch`` describe the click;
    ``click_prob`` is the choice model's probability of each shown item; ``affinity`` the true
    affinity of each shown item under the current preference; ``session_end`` marks slots whose
    session ended this step (they either return, or churn: ``terminated``).
    """

    reward: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    chosen: np.ndarray
    event: np.ndarray
    watch: np.ndarray
    click_prob: np.ndarray
    affinity: np.ndarray
    time: np.ndarray
    session: np.ndarray
    position: np.ndarray
    session_end: np.ndarray


@dataclass
class StepDraws:
    """The random numbers of one batched step, one per slot (float64 (B,) each).

    ``choice``, ``like``, ``ret`` are uniforms in [0, 1) (the MNL choice by inverse CDF, the like
    coin, the return coin); ``noise`` a standard normal (watch-fraction noise); ``gap`` a
    standard exponential (days to the next session, before scaling).
    """

    choice: np.ndarray
    like: np.ndarray
    ret: np.ndarray
    noise: np.ndarray
    gap: np.ndarray


class Simulator:
    """State of B user slots and the batched step (the MDP's transition function).

    Args:
        world: the hidden truth.
        config: environment config (user model, reward, slate size, history length, horizon).
        num_slots: B.
    """

    def __init__(self, world: World, config: EnvConfig, num_slots: int) -> None:
        self.world = world
        self.config = config
        if config.user_model != world.user_model:
            raise ValueError(
                "config.user_model must equal the world's user_model (the world draws patience and "
                "item appeal from it); build the World with user_model=config.user_model"
            )
        self.um = world.user_model
        self.B = int(num_slots)
        self.k = config.slate_size
        self.L = config.history_length
        b, d, t, L = self.B, world.config.latent_dim, world.config.n_topics, self.L
        eps = world.config.cross_group_epsilon
        self.cross_log_eps = float(np.log(eps)) if eps > 0 else -np.inf
        self.pos_bias = position_bias(self.um, self.k)
        # world arrays used on the hot path
        self.latent = world.items.latent
        self.appeal = world.item_appeal
        self.item_group = world.items.group
        self.item_topic = world.items.topic
        self.quality = world.items.quality
        self.minutes = world.items.minutes
        self.release = world.items.release_time
        self.n_items = world.n_items
        self.fatigue_decay_per_day = np.log(2.0) / self.um.fatigue_half_life
        # a slate that is valid at any time (items released at time <= 0): used in place of the
        # ignored action of slots that are being reset
        initial = np.nonzero(released(self.release, 0.0))[0]
        if initial.size < self.k:
            raise ValueError(
                f"slate_size={self.k} exceeds the {initial.size} items available at time 0"
            )
        self.safe_slate = initial[: self.k].astype(np.int64)
        # --- state of the B slots
        self.user = np.zeros(b, dtype=np.int64)
        self.group = np.zeros(b, dtype=np.int64)
        self.pref = np.zeros((b, d), dtype=np.float32)
        self.fatigue = np.zeros((b, t), dtype=np.float32)  # stored F~ (see _fatigue_scale)
        self.fat_ref = np.zeros(b, dtype=np.float64)
        self.budget = np.zeros(b, dtype=np.float32)
        self.patience = np.zeros(b, dtype=np.float32)
        self.activity = np.zeros(b, dtype=np.float32)
        self.time = np.zeros(b, dtype=np.float64)
        self.session = np.zeros(b, dtype=np.int64)
        self.position = np.zeros(b, dtype=np.int64)
        self.steps = np.zeros(b, dtype=np.int64)
        self.sess_satisfaction = np.zeros(b, dtype=np.float32)
        self.h_items = np.zeros((b, L), dtype=np.int64)
        self.h_events = np.zeros((b, L), dtype=np.int64)
        self.h_time = np.zeros((b, L), dtype=np.float32)
        self.h_mask = np.zeros((b, L), dtype=np.int8)
        # --- random streams (common random numbers, see simenv.streams)
        self.stream_key: int | None = None  # the env seed's key; None until seed_streams
        self.stream = np.zeros(b, dtype=np.uint64)  # key of each slot's (user, episode)
        self.slot_episodes = np.zeros(b, dtype=np.int64)  # episodes started in each slot
        self.user_episodes = np.zeros(0, dtype=np.uint32)  # episodes started per user
        self._rows = np.arange(b)
        self._topic_row_offset = (np.arange(b) * t).astype(np.int64)  # flat index of (row, topic 0)

    # ------------------------------------------------------------------ reset
    def seed_streams(self, key: int) -> None:
        """Key every random draw by ``key`` (from the env seed) and restart episode counting."""
        self.stream_key = int(key)
        self.user_episodes = np.zeros(self.world.n_users, dtype=np.uint32)
        self.slot_episodes[:] = 0

    def reset_slots(self, rows: np.ndarray, users: np.ndarray | None = None) -> None:
        """Start a new user in each of ``rows`` (a new episode).

        ``users`` (default: all drawn) gives the user of each row; an entry ``-1`` means "draw
        one". A drawn user comes from the slot's stream, keyed by (seed, slot, episodes started
        in the slot). Each started user's episode number counts its earlier starts since
        :meth:`seed_streams` (rows in order when a user starts twice in one call), and keys
        that episode's stream: the start time is its first draw.
        """
        if self.stream_key is None:
            raise RuntimeError("seed_streams must be called before reset_slots (the env's reset)")
        rows = np.asarray(rows, dtype=np.int64)
        n = rows.size
        if n == 0:
            return
        w = self.world
        users = np.full(n, -1, dtype=np.int64) if users is None else np.asarray(users, np.int64)
        draw = users < 0
        if draw.any():
            keys = slot_keys(self.stream_key, rows[draw], self.slot_episodes[rows[draw]])
            picked = (uniforms(keys, 0) * w.n_users).astype(np.int64)
            users = users.copy()
            users[draw] = np.minimum(picked, w.n_users - 1)
        self.slot_episodes[rows] += 1
        episode = self.user_episodes[users].astype(np.int64) + occurrence_index(users)
        np.add.at(self.user_episodes, users, 1)
        keys = stream_keys(self.stream_key, users, episode)
        start = uniforms(keys, 0) * float(self.config.start_time_max)
        self.stream[rows] = keys
        self.user[rows] = users
        self.group[rows] = w.users.group[users]
        self.pref[rows] = w.users.preference[users]
        self.fatigue[rows] = 0.0
        self.fat_ref[rows] = start
        self.patience[rows] = w.users.patience[users]
        self.budget[rows] = w.users.patience[users]
        self.activity[rows] = w.users.activity[users]
        self.time[rows] = start
        self.session[rows] = 0
        self.position[rows] = 0
        self.steps[rows] = 0
        self.sess_satisfaction[rows] = 0.0
        self.h_items[rows] = 0
        self.h_events[rows] = 0
        self.h_time[rows] = 0.0
        self.h_mask[rows] = 0

    def draws(self) -> StepDraws:
        """The random numbers of every slot's current step.

        A pure function of the slot's stream and step counter: draws 0-5 of the step are the
        choice, like and return uniforms, two uniforms for the normal, and the gap.
        """
        u = step_uniforms(self.stream, self.steps, 6)  # (6, B)
        return StepDraws(
            choice=u[0],
            like=u[1],
            ret=u[2],
            noise=normal_from_uniforms(u[3], u[4]),
            gap=exponential_from_uniform(u[5]),
        )

    # ------------------------------------------------------------------ validation
    def validate(
        self, action: np.ndarray, rows: np.ndarray | None = None, name: str = "action"
    ) -> np.ndarray:
        """Check a (B, k) slate batch; raise ``ValueError`` naming the problem. No state change.

        Only ``rows`` (default: all) are checked; other rows are ignored by the step.
        """
        try:
            a = np.asarray(action)
        except (ValueError, TypeError) as e:  # e.g. ragged nested lists
            raise ValueError(
                f"{name} must be an integer array of shape ({self.B}, {self.k}), got {action!r} ({e})"
            ) from None
        if a.shape != (self.B, self.k):
            raise ValueError(f"{name} must have shape ({self.B}, {self.k}), got {a.shape}")
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{name} must hold integer item ids, got dtype {a.dtype}")
        sub = a if rows is None else a[rows]
        if sub.size == 0:
            return a.astype(np.int64, copy=False)
        lo, hi = sub.min(), sub.max()
        if lo < 0 or hi >= self.n_items:
            raise ValueError(
                f"{name} item ids must be in [0, {self.n_items - 1}], got values in [{lo}, {hi}]"
            )
        s = np.sort(sub, axis=1)
        eq = s[:, 1:] == s[:, :-1]
        if eq.any():
            r = int(np.nonzero(eq.any(axis=1))[0][0])
            raise ValueError(
                f"{name} must hold distinct items per slate; row {r} has duplicates: {sub[r].tolist()}"
            )
        t = self.time if rows is None else self.time[rows]
        unreleased = ~released(self.release[sub], t[:, None])  # simenv.clock: one definition
        if unreleased.any():
            r, j = (int(x[0]) for x in np.nonzero(unreleased))
            raise ValueError(
                f"{name} contains unreleased item {int(sub[r, j])} (release time "
                f"{format_time(self.release[sub[r, j]])} > current time "
                f"{format_time(observed_time(t[r]))}, the float32 time the observation carries; "
                f"float64 clock {format_time(t[r])}); only items with release_time <= time may "
                "be recommended"
            )
        return a.astype(np.int64, copy=False)

    # ------------------------------------------------------------------ fatigue (lazy decay)
    # Fatigue decays exponentially in time for all topics at once. Instead of multiplying the
    # (B, n_topics) matrix every step, we store F~ with a per-slot reference time tau:
    #   F = F~ * exp(-lambda (t - tau)).
    # Reads multiply by one factor per slot; an increment adds inc * exp(lambda (t - tau)); a
    # row is renormalised (tau <- t) when that factor grows past e^10, which happens only after
    # long gaps. Same numbers as the eager update up to float rounding.
    def _fatigue_scale(self) -> np.ndarray:
        return np.exp(-self.fatigue_decay_per_day * (self.time - self.fat_ref)).astype(np.float32)

    def _renormalise_fatigue(self) -> None:
        stale = np.nonzero(self.fatigue_decay_per_day * (self.time - self.fat_ref) > 10.0)[0]
        if stale.size:
            self.fatigue[stale] *= self._fatigue_scale()[stale, None]
            self.fat_ref[stale] = self.time[stale]

    def current_fatigue(self) -> np.ndarray:
        """Fatigue per topic, float32 (B, n_topics), decayed to each slot's current time."""
        return self.fatigue * self._fatigue_scale()[:, None]

    # ------------------------------------------------------------------ step
    def step(
        self,
        slate: np.ndarray,
        active: np.ndarray | None = None,
        draws: StepDraws | None = None,
    ) -> StepResult:
        """Advance every active slot by one slate. ``slate`` must already be validated.

        Rows not in ``active`` (a bool mask; ``None`` = all) are computed on a safe slate and
        must be reset by the caller; their results are meaningless. ``draws`` defaults to
        :meth:`draws` (the slots' own streams); tests pass explicit numbers.
        """
        um = self.um
        B, k, d = self.B, self.k, self.latent.shape[1]
        if active is not None and not active.all():
            slate = slate.copy()
            slate[~active] = self.safe_slate
        if draws is None:
            draws = self.draws()
        u_choice, u_like, u_return = draws.choice, draws.like, draws.ret
        noise, gap_draw = draws.noise, draws.gap
        # The slate-level arrays are position-major, (k, B): reductions over the k slate
        # positions then become k element-wise passes over contiguous B-vectors, several
        # times faster in numpy than reducing short rows of a (B, k) array.
        slate_t = np.ascontiguousarray(slate.T)  # (k, B)
        flat = slate_t.ravel()

        # 1. utilities of the shown items
        z = np.take(self.latent, flat, axis=0).reshape(k, B, d)  # (k, B, d)
        match = np.einsum("kbd,bd->kb", z, self.pref)  # (k, B) <p_b, z_i>
        topics = np.take(self.item_topic, flat).reshape(k, B)
        fat = np.take(self.fatigue.ravel(), topics + self._topic_row_offset)  # (k, B) stored F~
        fat *= self._fatigue_scale()  # decayed to now
        same = np.take(self.item_group, flat).reshape(k, B) == self.group  # (k, B)
        appeal = np.take(self.appeal, flat).reshape(k, B)
        static = um.affinity_scale * match + appeal  # (k, B) alpha <p, z> + appeal
        util = slate_utilities(static, fat, same, self.pos_bias, self.cross_log_eps)

        # 2. choice: multinomial logit with a no-click option
        chosen, click_prob_t = choose(util, um.no_click_utility, u_choice)
        clicked = chosen >= 0
        cpos = np.maximum(chosen, 0)
        item = slate_t[cpos, self._rows]  # (B,) chosen item (garbage where no click)

        # 3. response of the chosen item
        resp = respond(
            clicked,
            match[cpos, self._rows],
            self.quality[item],
            fat[cpos, self._rows],
            self.minutes[item],
            noise,
            u_like,
            um,
        )
        reward = step_reward(resp, self.config.reward)

        # 4. transitions
        # 4a. time: a slate takes step_minutes, plus the watch time; an event is stamped with
        # the time its slate was requested (as in the impression log)
        request_time = self.time.copy()
        self.time += (um.step_minutes + resp.watch_minutes) / _MIN_PER_DAY
        crow = np.nonzero(clicked)[0]
        if crow.size:
            citem = item[crow]
            ctopic = self.item_topic[citem]
            # 4b. fatigue grows on the consumed topic (and decays lazily, see above)
            inc = um.fatigue_increment / self._fatigue_scale()[crow]
            self.fatigue[crow, ctopic] += inc
            # 4c. interest drift toward the consumed item, scaled by the watch fraction, then
            # back onto the unit sphere: p <- normalize(p + rho w (z - p)). (A convex mix of two
            # unit vectors is shorter than 1; without renormalising, |p| fell to 0.7 over 150
            # oracle steps and every utility alpha <p, z> silently shrank over a lifetime.)
            rate = (um.drift_rate * resp.watch_fraction[crow])[:, None]
            p = self.pref[crow]
            p += rate * (self.latent[citem] - p)  # (n, d)
            p /= np.maximum(np.sqrt(np.einsum("nd,nd->n", p, p)), np.float32(1e-12))[:, None]
            self.pref[crow] = p
            # 4d. history: append the engagement event (oldest first, newest last)
            for arr, val in (
                (self.h_items, citem),
                (self.h_events, resp.event[crow]),
                (self.h_time, request_time[crow]),
                (self.h_mask, 1),
            ):
                arr[crow, :-1] = arr[crow, 1:]
                arr[crow, -1] = val
        # 4e. session budget: every slate costs, satisfaction refills (up to the patience)
        satisfaction = resp.watch_fraction.copy()
        satisfaction[resp.event == EventType.LIKE] += 0.5
        satisfaction[resp.event == EventType.DISLIKE] -= 0.5
        self.budget += um.refill * satisfaction - um.step_cost
        np.minimum(self.budget, self.patience, out=self.budget)
        self.sess_satisfaction += satisfaction
        self.position += 1
        self.steps += 1
        out_position = self.position - 1
        out_session = self.session.copy()
        # 4f. leaving: the session ends when the budget runs out; the user returns with a
        # probability that rises with the session's mean satisfaction, otherwise churns
        ended = self.budget <= 0
        terminated = np.zeros(B, dtype=bool)
        er = np.nonzero(ended)[0]
        if er.size:
            sat_rate = self.sess_satisfaction[er] / self.position[er]
            p_ret = (0.5 + 0.5 * self.activity[er]) / (
                1.0 + np.exp(-um.return_slope * (sat_rate - um.return_reference))
            )
            returns = u_return[er] < p_ret
            terminated[er[~returns]] = True
            rr = er[returns]
            if rr.size:
                # the gap: fatigue decays over it through the lazy scale
                self.time[rr] += gap_draw[rr] * um.mean_session_gap / self.activity[rr]
                self.session[rr] += 1
                self.position[rr] = 0
                self.budget[rr] = self.patience[rr]
                self.sess_satisfaction[rr] = 0.0
        self._renormalise_fatigue()
        truncated = (self.steps >= self.config.max_steps) & ~terminated
        # ground truth for info: P(click) of each shown item alone at the top, current preference,
        # sigmoid(utility - u_0) with the other-group term inside the utility (as World.affinity)
        if self.cross_log_eps != -np.inf:
            static[~same] += np.float32(self.cross_log_eps)
        with np.errstate(over="ignore"):
            affinity = 1.0 / (1.0 + np.exp(um.no_click_utility - static))
        if self.cross_log_eps == -np.inf:
            affinity *= same
        affinity = affinity.T  # (B, k)
        click_prob = click_prob_t.T
        return StepResult(
            reward=reward,
            terminated=terminated,
            truncated=truncated,
            chosen=chosen,
            event=resp.event,
            watch=resp.watch_minutes,
            click_prob=click_prob,
            affinity=affinity.astype(np.float32, copy=False),
            time=self.time.copy(),
            session=out_session,
            position=out_position,
            session_end=ended,
        )

    # ------------------------------------------------------------------ observation
    def observation(self, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Observation dict of the slots (copies), batched ``(B, ...)`` or for ``rows``."""
        sl = slice(None) if rows is None else rows
        t = observed_time(self.time[sl])  # float32: the time "released" is decided at
        mask = self.h_mask[sl]
        dt = t[:, None] - self.h_time[sl]  # (B, L) days since each event
        dt *= mask
        context = np.stack([t, self.session[sl], self.position[sl]], axis=1).astype(np.float32)
        return {
            Obs.ITEMS: self.h_items[sl].copy(),
            Obs.EVENTS: self.h_events[sl].copy(),
            Obs.DT: dt,
            Obs.MASK: mask.copy(),
            Obs.CONTEXT: context,
            Obs.USER: self.user[sl, None].copy(),  # (B, 1): no 0-d entry in RecEnv
        }

    # ------------------------------------------------------------------ truth
    def _truth_terms(
        self, items: np.ndarray, rows: np.ndarray | slice
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(match <p, z_i>, fatigue on the item's topic, same group)`` (b, K) of slots ``rows``.

        ``items`` is int (b, K) per slot or (K,) shared by all of them.
        """
        items = np.asarray(items, dtype=np.int64)
        pref = self.pref[rows]  # (b, d)
        fat_now = self.current_fatigue()[rows]  # (b, T)
        group = self.group[rows]
        if items.ndim == 1:
            match = pref @ self.latent[items].T  # (b, K)
            fat = fat_now[:, self.item_topic[items]]
            same = self.item_group[items][None, :] == group[:, None]
        else:
            match = np.matmul(self.latent[items], pref[:, :, None])[:, :, 0]  # (b, K)
            fat = np.take_along_axis(fat_now, self.item_topic[items], axis=1)
            same = self.item_group[items] == group[:, None]
        return match, fat, same

    def _utility_from_terms(
        self, items: np.ndarray, match: np.ndarray, fat: np.ndarray, same: np.ndarray
    ) -> np.ndarray:
        util = self.um.affinity_scale * match
        util += self.appeal[np.asarray(items, dtype=np.int64)]
        util -= fat
        if self.cross_log_eps == -np.inf:
            util[~same] = -np.inf
        else:
            util[~same] += np.float32(self.cross_log_eps)
        return util.astype(np.float32, copy=False)

    def true_utility(self, items: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """Current click utility (drifted preference and fatigue, no position term).

        Args:
            items: int (B, K) per slot, or (K,) shared by all slots.
            rows: slots to compute (default all; ``items`` then has ``len(rows)`` rows if 2-D).

        Returns:
            float32 (B, K); ``-inf`` (or ``+ log(epsilon)``) for other-group items.
        """
        sl = slice(None) if rows is None else rows
        match, fat, same = self._truth_terms(items, sl)
        return self._utility_from_terms(items, match, fat, same)

    def click_reward(self, items: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """Expected reward of a click on each item, given the current state: float64 (B, K).

        With ``mu = kappa (<p, z_i> - offset) + 0.5 q_i - F[topic_i]`` the watch fraction is
        ``w = sigmoid(mu + sigma N(0, 1))`` (RecEnv equation 3), so
        ``P(dislike) = Phi((logit(dislike_threshold) - mu) / sigma)``,
        ``P(like) = like_probability * Phi((mu - logit(like_threshold)) / sigma)`` and
        ``E[w]`` is a 32-node Gauss-Hermite integral; the click reward is
        ``c_click + c_like P(like) + c_dislike P(dislike) + c_watch E[w] length_i`` (equation 4).
        ``sigma = 0`` gives the deterministic thresholds.

        Args:
            items: int (B, K) per slot, or (K,) shared by all slots.
            rows: slots to compute (default all).
        """
        sl = slice(None) if rows is None else rows
        match, fat, _ = self._truth_terms(items, sl)
        return self._click_reward_from_terms(np.asarray(items, dtype=np.int64), match, fat)

    def _click_reward_from_terms(
        self, items: np.ndarray, match: np.ndarray, fat: np.ndarray
    ) -> np.ndarray:
        um, rc = self.um, self.config.reward
        mu = um.watch_sharpness * (match.astype(np.float64) - um.watch_offset)
        mu += 0.5 * self.quality[items].astype(np.float64)
        mu -= fat
        sigma = float(um.watch_noise)

        def logit(p: float) -> float:
            if p <= 0.0:
                return -np.inf
            if p >= 1.0:
                return np.inf
            return float(np.log(p / (1.0 - p)))

        def below(threshold: float) -> np.ndarray:  # P(w < threshold)
            x = logit(threshold)
            if sigma == 0.0:
                return (mu < x).astype(np.float64)
            return special.ndtr((x - mu) / sigma)

        out = np.full(mu.shape, float(rc.click))
        if rc.dislike:
            out += rc.dislike * below(um.dislike_threshold)
        if rc.like:
            out += rc.like * um.like_probability * (1.0 - below(um.like_threshold))
        if rc.watch:
            if sigma == 0.0:
                ew = special.expit(mu)
            else:  # E[sigmoid(mu + sigma eps)], eps ~ N(0, 1): Gauss-Hermite quadrature
                x, w = np.polynomial.hermite.hermgauss(32)
                ew = np.zeros_like(mu)
                for xn, wn in zip(x, w, strict=True):
                    ew += (wn / np.sqrt(np.pi)) * special.expit(mu + sigma * np.sqrt(2.0) * xn)
            out += rc.watch * ew * self.minutes[items].astype(np.float64)
        return out

    def expected_reward(self, slates: np.ndarray) -> np.ndarray:
        """Expected reward of showing each slot its slate now: float64 (B,) (reads the truth).

        ``E[r] = sum_j P(j) g(i_j)``: the MNL click probability of position j with position bias
        and the no-click option (equations 1-2) times the expected reward of a click on the
        item there (:meth:`click_reward`). One step only: the effect on later steps (fatigue,
        drift, budget, returns) is not counted.

        Args:
            slates: int (B, k') distinct item ids per slot (k' <= the env's k is allowed).
        """
        slates = np.asarray(slates, dtype=np.int64)
        match, fat, same = self._truth_terms(slates, slice(None))
        util = self._utility_from_terms(slates, match, fat, same).astype(np.float64)
        util += position_bias(self.um, slates.shape[1])  # (B, k')
        u0 = float(self.um.no_click_utility)
        m = np.maximum(util.max(axis=1), u0)  # (B,) stabiliser
        e = np.exp(util - m[:, None])  # (B, k')
        g = self._click_reward_from_terms(slates, match, fat)
        return (e * g).sum(axis=1) / (e.sum(axis=1) + np.exp(u0 - m))

    def best_slates(
        self, k: int | None = None, kind: str = "utility"
    ) -> tuple[np.ndarray, np.ndarray]:
        """Oracle slates per slot (reads the truth), over the released catalog.

        ``kind="utility"``: the k released items of highest current click utility, best first;
        returns ``(items int64 (B, k), utility float32 (B, k))``. Greedy in the utility only:
        it ignores likes, dislikes, watch time and what the slate does to later steps, and the
        position term (which lowers every item's utility by the same amount per position).

        ``kind="expected_reward"``: a greedy sequential build in the expected reward of the
        configured reward mix (:meth:`expected_reward`). A slate's expected reward under the
        MNL is not a sum over its items (each item takes click probability from the others and
        from no-click), so position ``j = 0, 1, ...`` gets the released item not yet chosen that
        maximises the expected reward of the slate so far with that item at position j (its
        position bias included); items that would lower it are placed only when every item
        would. Returns ``(items int64 (B, k), the expected reward of the first j + 1 items,
        float64 (B, k))``. Myopic as well (one step), and greedy, not the exact optimum.
        """
        k = self.k if k is None else int(k)
        if kind == "expected_reward":
            return self._best_expected_reward(k)
        if kind != "utility":
            raise ValueError(f"kind must be 'utility' or 'expected_reward', got {kind!r}")
        chunk = max(4096, (1 << 23) // max(self.B, 1))  # bounds memory at about B x chunk floats
        best_s = np.full((self.B, 0), -np.inf, dtype=np.float32)
        best_i = np.zeros((self.B, 0), dtype=np.int64)
        for s in range(0, self.n_items, chunk):
            ids = np.arange(s, min(self.n_items, s + chunk))
            util = self.true_utility(ids)
            util[~released(self.release[ids][None, :], self.time[:, None])] = -np.inf
            cs = np.concatenate([best_s, util], axis=1)
            ci = np.concatenate([best_i, np.broadcast_to(ids, (self.B, ids.size))], axis=1)
            kk = min(k, cs.shape[1])
            part = np.argpartition(-cs, kk - 1, axis=1)[:, :kk]
            best_s = np.take_along_axis(cs, part, axis=1)
            best_i = np.take_along_axis(ci, part, axis=1)
        order = np.argsort(-best_s, axis=1, kind="stable")
        return np.take_along_axis(best_i, order, axis=1), np.take_along_axis(best_s, order, axis=1)

    def _best_expected_reward(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The greedy sequential expected-reward build of :meth:`best_slates`.

        Without cross-group clicks (``cross_group_epsilon = 0``) each group's users are scored
        on their own group's items only, and an item of another group, never clicked, stands
        for "change nothing": it fills a position when every own-group item would lower the
        slate's expected reward. Row blocks bound memory at about 2M entries per array.
        """
        out_i = np.zeros((self.B, k), dtype=np.int64)
        out_v = np.zeros((self.B, k), dtype=np.float64)
        initial = released(self.release, 0.0)  # valid at any time
        if self.cross_log_eps == -np.inf:
            segments = []
            for g in np.unique(self.group):
                own = self.item_group == g
                fillers = np.nonzero(~own & initial)[0][:k]  # other groups, released at 0
                segments.append((np.nonzero(self.group == g)[0], np.nonzero(own)[0], fillers))
        else:  # every item can be clicked: the whole catalog, no neutral filler
            segments = [(np.arange(self.B), np.arange(self.n_items), np.zeros(0, np.int64))]
        for rows_all, ids, fillers in segments:
            block = max(8, (1 << 21) // max(ids.size, 1))
            for r0 in range(0, rows_all.size, block):
                rows = rows_all[r0 : r0 + block]
                items, value = self._greedy_block(rows, ids, fillers, k)
                out_i[rows], out_v[rows] = items, value
        return out_i, out_v

    def _greedy_block(
        self, rows: np.ndarray, ids: np.ndarray, fillers: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Greedy build for slots ``rows`` over candidate items ``ids`` (plus neutral fillers)."""
        b = rows.size
        u0 = float(self.um.no_click_utility)
        rho = np.exp(position_bias(self.um, k).astype(np.float64))  # (k,) e^{pos_j}
        match, fat, same = self._truth_terms(ids, rows)  # (b, n)
        util = self._utility_from_terms(ids, match, fat, same)  # float32 (b, n)
        g = self._click_reward_from_terms(ids, match, fat)  # float64 (b, n)
        del match, fat, same
        c = np.maximum(util.max(axis=1).astype(np.float64), u0)  # (b,) stabiliser: e <= 1
        e = np.exp(util - c[:, None].astype(np.float32))  # (b, n) e^{u_i - c}
        eg = e * g.astype(np.float32)  # (b, n)
        gone = ~released(self.release[ids][None, :], self.time[rows, None])  # (b, n)
        e[gone], eg[gone] = 0.0, -np.inf  # unreleased (later: chosen) items score -inf
        num = np.zeros(b)  # sum over chosen of e^{u + pos} g, scaled by e^{-c}
        den = np.exp(u0 - c)  # e^{u_0} + sum over chosen of e^{u + pos}, scaled by e^{-c}
        n_fill = np.zeros(b, dtype=np.int64)
        br = np.arange(b)
        items = np.zeros((b, k), dtype=np.int64)
        value = np.zeros((b, k))
        for j in range(k):
            r = np.float32(rho[j])
            val = eg * r  # (b, n) value of the slate so far with item i at position j
            val += num[:, None].astype(np.float32)
            w = e * r
            w += den[:, None].astype(np.float32)
            val /= w
            pick = np.argmax(val, axis=1)  # (b,) first best: deterministic ties
            wp = rho[j] * e[br, pick].astype(np.float64)
            new_num = num + wp * g[br, pick]
            new_den = den + wp
            fill = np.zeros(b, dtype=bool)
            if fillers.size:  # a neutral item instead, where the best one lowers the value
                fill = (~np.isfinite(val[br, pick]) | (new_num / new_den < num / den)) & (
                    n_fill < fillers.size
                )
            take = ~fill
            items[take, j] = ids[pick[take]]
            num[take], den[take] = new_num[take], new_den[take]
            e[br[take], pick[take]], eg[br[take], pick[take]] = 0.0, -np.inf
            items[fill, j] = fillers[np.minimum(n_fill[fill], fillers.size - 1)]
            n_fill += fill
            value[:, j] = num / den
        return items, value
