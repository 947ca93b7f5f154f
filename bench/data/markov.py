"""A Markov-chain language whose entropy rate is known exactly: every report gets a loss floor.

Rows of the transition matrix are drawn from a symmetric Dirichlet(concentration): small values
give peaked, predictable transitions. A perfect model's loss per token is the entropy rate
H = −Σ_i π_i Σ_j P_ij ln P_ij (nats), π the stationary distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MarkovChain:
    transition: np.ndarray  # (V, V), rows sum to 1

    @classmethod
    def random(cls, vocab_size: int, concentration: float, seed: int) -> MarkovChain:
        rng = np.random.default_rng(seed)
        return cls(rng.dirichlet(np.full(vocab_size, concentration), size=vocab_size))

    @property
    def stationary(self) -> np.ndarray:
        """π with π·P = π, Σπ = 1 (solved as a least-squares system: exact for an ergodic chain)."""
        v = len(self.transition)
        system = np.vstack([self.transition.T - np.eye(v), np.ones(v)])
        rhs = np.zeros(v + 1)
        rhs[-1] = 1.0
        return np.linalg.lstsq(system, rhs, rcond=None)[0]

    def entropy_rate(self) -> float:
        """Nats per token of a perfect model."""
        p = self.transition
        row_entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=1)
        return float(self.stationary @ row_entropy)

    def sample(self, n_chains: int, length: int, rng: np.random.Generator) -> np.ndarray:
        """(n_chains, length) tokens; each chain starts from the stationary distribution."""
        cumulative = np.cumsum(self.transition, axis=1)
        cumulative[:, -1] = 1.0
        out = np.empty((n_chains, length), dtype=np.int64)
        out[:, 0] = rng.choice(len(self.transition), size=n_chains, p=self.stationary.clip(0) / self.stationary.clip(0).sum())
        for t in range(1, length):
            u = rng.random(n_chains)
            out[:, t] = (cumulative[out[:, t - 1]] < u[:, None]).sum(axis=1)
        return out

    def nll(self, chains: np.ndarray) -> float:
        """Mean negative log-likelihood (nats) of the transitions in chains (N, L) under the true model."""
        return float(-np.log(self.transition[chains[:, :-1], chains[:, 1:]]).mean())
