"""Similarity functions of the two towers: dot product or cosine, with a temperature.

The lecture ("Функции похожести") compares two scores for a user vector ``u`` and an item
vector ``i``:

- dot product ``<u, i> = cos(u, i) * ||u|| * ||i||``: the norms are free, and under a softmax
  loss the item norm learns popularity, since ``dL/d||p|| = -cos(u, p) * [1 - P(p | u)]``
  pushes ``||p||`` up on every step where the angle is right, and popular items get the most
  steps;
- cosine ``cos(u, i) = <u / ||u||, i / ||i||>``: the norms are removed, training is steadier,
  but the scores live in ``[-1, 1]``, so a softmax over ``n`` negatives cannot be confident
  (``e / (e + (n - 1) / e)`` is about 0.07 for ``n = 100``). A temperature fixes this:
  ``f(u, i) = cos(u, i) / tau``, either fixed or learnable as
  ``tau = clip(exp(s), 0.01, 100)`` with ``s`` initialised at 0. With ``gamma = 1 / tau``
  the full-softmax gradient is ``dL/dgamma = -cos(u, p) + E_{d ~ P(d|u)} cos(u, d)``.

Every score this module returns is ``similarity / tau``. The division is applied to the user
side (``B x d`` numbers) rather than to the ``B x M`` score matrix: same result, less work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SimilarityConfig", "Similarity", "norm_popularity_correlation"]

_KINDS = ("dot", "cosine")


@dataclass(frozen=True)
class SimilarityConfig:
    """How user and item vectors are compared.

    Attributes:
        kind: ``"dot"`` (inner product, norms free) or ``"cosine"`` (both sides
            l2-normalised first).
        temperature: fixed temperature ``tau`` when ``learnable_temperature`` is False;
            ``None`` means no temperature (``tau = 1``). Must stay ``None`` or ``1.0`` when the
            temperature is learnable (set ``init_log_tau`` instead).
        learnable_temperature: learn ``tau = clip(exp(s), tau_min, tau_max)`` (the lecture's
            recipe), with the scalar ``s`` initialised at ``init_log_tau``.
        init_log_tau: initial value of ``s`` (0 in the lecture, that is ``tau = 1``).
        tau_min: lower clip of the learnable temperature (0.01 in the lecture).
        tau_max: upper clip of the learnable temperature (100 in the lecture).
    """

    kind: Literal["dot", "cosine"] = "dot"
    temperature: float | None = 1.0
    learnable_temperature: bool = False
    init_log_tau: float = 0.0
    tau_min: float = 0.01
    tau_max: float = 100.0

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {self.kind!r}")
        if not (math.isfinite(self.tau_min) and self.tau_min > 0):
            raise ValueError(f"tau_min must be a finite number > 0, got {self.tau_min}")
        if not (math.isfinite(self.tau_max) and self.tau_max > self.tau_min):
            raise ValueError(
                f"tau_max must be finite and > tau_min={self.tau_min}, got {self.tau_max}"
            )
        if self.temperature is not None and not (
            math.isfinite(self.temperature) and self.temperature > 0
        ):
            raise ValueError(
                f"temperature must be None or a finite number > 0, got {self.temperature}"
            )
        if self.learnable_temperature:
            if self.temperature not in (None, 1.0):
                raise ValueError(
                    "temperature must be None (or the default 1.0) when learnable_temperature "
                    f"is True; got temperature={self.temperature}: set init_log_tau instead"
                )
            lo, hi = math.log(self.tau_min), math.log(self.tau_max)
            if not (math.isfinite(self.init_log_tau) and lo <= self.init_log_tau <= hi):
                raise ValueError(
                    f"init_log_tau must lie in [log(tau_min), log(tau_max)] = [{lo:.4g}, "
                    f"{hi:.4g}] (outside it the clip kills the gradient), got {self.init_log_tau}"
                )


class Similarity(nn.Module):
    """Score ``f(u, i) = sim(u, i) / tau`` with ``sim`` dot or cosine.

    Args:
        config: a :class:`SimilarityConfig`.

    Example:
        >>> sim = Similarity(SimilarityConfig(kind="cosine", temperature=0.1))
        >>> u = torch.tensor([[3.0, 4.0]])
        >>> v = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> sim(u, v)
        tensor([[6., 8.]])
    """

    def __init__(self, config: SimilarityConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else SimilarityConfig()
        if self.config.learnable_temperature:
            # The lecture's learnable scalar s, tau = clip(exp(s), 0.01, 100), s initialised at 0.
            self.log_tau = nn.Parameter(torch.tensor(float(self.config.init_log_tau)))
        else:
            self.register_parameter("log_tau", None)
            fixed = 1.0 if self.config.temperature is None else float(self.config.temperature)
            self._fixed_gamma = 1.0 / fixed  # Python float: exact in any dtype
            self.register_buffer("_fixed_tau", torch.tensor(fixed), persistent=False)

    @property
    def kind(self) -> str:
        """``"dot"`` or ``"cosine"``."""
        return self.config.kind

    @property
    def tau(self) -> torch.Tensor:
        """Temperature as a 0-d tensor (differentiable when learnable)."""
        if self.log_tau is None:
            return self._fixed_tau
        # tau = clip(exp(s), tau_min, tau_max): outside the clip the gradient is 0.
        return torch.clamp(torch.exp(self.log_tau), self.config.tau_min, self.config.tau_max)

    @property
    def gamma(self) -> torch.Tensor:
        """Inverse temperature ``gamma = 1 / tau`` (the model's confidence)."""
        return 1.0 / self.tau

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Map vectors to the space where the score is a plain inner product.

        Cosine: l2-normalise the last dimension; dot: identity.
        """
        if self.config.kind == "cosine":
            return F.normalize(x, p=2.0, dim=-1)
        return x

    def query(self, user: torch.Tensor) -> torch.Tensor:
        """Prepare user vectors and divide them by ``tau``.

        Scores against prepared item vectors ``k`` are then the plain product ``query(u) @ k.T``.
        """
        if self.log_tau is None:
            return self.prepare(user) * self._fixed_gamma
        return self.prepare(user) * self.gamma.to(user.dtype)

    def forward(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Every user against every item.

        Args:
            user: ``(B, d)`` user vectors.
            items: ``(M, d)`` item vectors.

        Returns:
            ``(B, M)`` scores ``sim / tau``.
        """
        _check_dims("user", user, 2)
        _check_dims("items", items, 2)
        _check_same_d(user, items)
        return self.query(user) @ self.prepare(items).T  # (B, M)

    def paired(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Row ``b`` of ``user`` against row ``b`` of ``items``.

        Args:
            user: ``(B, d)``.
            items: ``(B, d)``.

        Returns:
            ``(B,)`` scores ``sim / tau``.
        """
        _check_dims("user", user, 2)
        _check_dims("items", items, 2)
        if user.shape != items.shape:
            raise ValueError(
                f"items must have the shape of user {tuple(user.shape)}, got {tuple(items.shape)}"
            )
        return (self.query(user) * self.prepare(items)).sum(-1)  # (B,)

    def batched(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Each user against its own list of items.

        Args:
            user: ``(B, d)``.
            items: ``(B, M, d)``.

        Returns:
            ``(B, M)`` scores ``sim / tau``.
        """
        _check_dims("user", user, 2)
        _check_dims("items", items, 3)
        if items.shape[0] != user.shape[0] or items.shape[2] != user.shape[1]:
            raise ValueError(
                f"items must have shape (B={user.shape[0]}, M, d={user.shape[1]}), "
                f"got {tuple(items.shape)}"
            )
        q = self.query(user).unsqueeze(-1)  # (B, d, 1)
        return torch.bmm(self.prepare(items), q).squeeze(-1)  # (B, M)

    def extra_repr(self) -> str:
        """Kind and temperature for ``print(module)``."""
        c = self.config
        if c.learnable_temperature:
            return f"kind={c.kind}, learnable tau in [{c.tau_min}, {c.tau_max}]"
        return f"kind={c.kind}, tau={float(self._fixed_tau):g}"


def _check_dims(name: str, x: torch.Tensor, ndim: int) -> None:
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")


def _check_same_d(user: torch.Tensor, items: torch.Tensor) -> None:
    if user.shape[-1] != items.shape[-1]:
        raise ValueError(
            f"items must have the user's vector size d={user.shape[-1]}, got {items.shape[-1]}"
        )


def norm_popularity_correlation(
    item_vectors: torch.Tensor | np.ndarray, popularity: torch.Tensor | np.ndarray
) -> float:
    """Spearman rank correlation between item-vector norms and item popularity.

    With a dot product the norms tend to learn popularity (see the module docstring);
    reports show this figure per model. Cosine models should use the raw (un-normalised)
    tower outputs here.

    Args:
        item_vectors: ``(N, d)`` item vectors.
        popularity: ``(N,)`` popularity (counts or probabilities).

    Returns:
        Spearman's rho in ``[-1, 1]``; NaN when the norms or the popularity are constant
        (the correlation is undefined there).
    """
    from scipy.stats import spearmanr

    vec = np.asarray(
        item_vectors.detach().cpu().numpy() if torch.is_tensor(item_vectors) else item_vectors,
        dtype=np.float64,
    )
    pop = np.asarray(
        popularity.detach().cpu().numpy() if torch.is_tensor(popularity) else popularity,
        dtype=np.float64,
    )
    if vec.ndim != 2:
        raise ValueError(f"item_vectors must be 2-D (N, d), got shape {vec.shape}")
    if pop.shape != (vec.shape[0],):
        raise ValueError(f"popularity must have shape ({vec.shape[0]},), got {pop.shape}")
    if vec.shape[0] < 2:
        raise ValueError(f"need at least 2 items, got N={vec.shape[0]}")
    norms = np.linalg.norm(vec, axis=1)
    # Normalised vectors have norms 1 up to rounding: treat that as constant, not as noise.
    if np.ptp(norms) <= 1e-6 * max(float(norms.max()), 1e-30) or np.ptp(pop) == 0:
        return float("nan")
    return float(spearmanr(norms, pop).statistic)
