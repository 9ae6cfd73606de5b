"""The report's statistics as pure functions: paired comparisons of two methods over test
games, each game played by every seed of both methods.

The unit is the game (a split holds each game once; see `ipr_core.envs`), and within a game
the seed (the methods of seed s share its SFT model and its data, so A and B are paired by
game and seed). A - B is the mean over games of the game's mean over seeds of A - B.
- Interval: a hierarchical percentile bootstrap: resample games with replacement and, within
  each drawn game, its seeds with replacement (both are samples: of games from the env, of
  training runs from the seeds).
- Test: a paired sign-flip permutation test over games (the null: A and B are exchangeable
  within each game, so each game's difference is as likely negated), two-sided, on the mean
  of the per-game differences; exact over all 2^n sign vectors for up to `MAX_EXACT_GAMES`
  games, Monte Carlo with a fixed seed beyond.
- Verdict (the two-test rule): "A beats B" only when the interval is above 0 AND p < 0.05.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import product

import numpy as np
import pandas as pd

N_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
N_PERMUTATIONS = 100_000
PERMUTATION_SEED = 0
MAX_EXACT_GAMES = 16
"""2^16 sign vectors: beyond that the test samples them."""
ALPHA = 0.05
METRICS = ("reward", "success", "steps")
LOWER_IS_BETTER = frozenset({"steps"})
"""Fewer steps is the paper's action-efficiency claim."""
_TOLERANCE = 1e-9
"""Differences of float means closer than this are equal (0.1 + 0.2 vs 0.3)."""


def _games_by_seeds(diffs: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-game seed differences as a NaN-padded (games x max seeds) matrix and the seed
    count of each game."""
    if not diffs or any(len(game) == 0 for game in diffs):
        raise ValueError("expected at least one game, each with at least one seed")
    counts = np.array([len(game) for game in diffs])
    matrix = np.full((len(diffs), counts.max()), np.nan)
    for i, game in enumerate(diffs):
        matrix[i, : len(game)] = np.asarray(game, dtype=float)
    return matrix, counts


def game_means(diffs: Sequence[Sequence[float]]) -> np.ndarray:
    """Each game's mean over its seeds."""
    matrix, _ = _games_by_seeds(diffs)
    return np.nanmean(matrix, axis=1)


def hierarchical_bootstrap(
    diffs: Sequence[Sequence[float]],
    n_resamples: int = N_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float, float]:
    """(mean difference, 2.5th, 97.5th percentile) of A - B, where `diffs[g]` holds game g's
    per-seed differences: games resampled, then seeds within each drawn game."""
    matrix, counts = _games_by_seeds(diffs)
    n_games, max_seeds = matrix.shape
    rng = np.random.default_rng(seed)
    games = rng.integers(0, n_games, size=(n_resamples, n_games))
    drawn_counts = counts[games]
    seeds = (rng.random((n_resamples, n_games, max_seeds)) * drawn_counts[..., None]).astype(int)
    values = matrix[games[..., None], seeds]
    used = np.arange(max_seeds) < drawn_counts[..., None]
    resampled = (np.where(used, values, 0.0).sum(axis=2) / drawn_counts).mean(axis=1)
    low, high = np.percentile(resampled, [2.5, 97.5])
    return float(np.nanmean(matrix, axis=1).mean()), float(low), float(high)


def sign_flip_p(
    game_diffs: Sequence[float] | np.ndarray,
    n_permutations: int = N_PERMUTATIONS,
    seed: int = PERMUTATION_SEED,
    max_exact: int = MAX_EXACT_GAMES,
) -> float:
    """Two-sided p of the mean per-game difference under random sign flips: exact (the share
    of all 2^n sign vectors at least as extreme) for n <= `max_exact`, else (1 + hits) /
    (1 + n_permutations) over sampled sign vectors."""
    diffs = np.asarray(game_diffs, dtype=float)
    if diffs.ndim != 1 or len(diffs) == 0:
        raise ValueError("expected a non-empty 1-d array of per-game differences")
    observed = abs(diffs.mean())
    if len(diffs) <= max_exact:
        signs = np.array(list(product((1.0, -1.0), repeat=len(diffs))))
        return float(np.mean(np.abs(signs @ diffs) / len(diffs) >= observed - _TOLERANCE))
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, n_permutations, 10_000):  # bounded memory for many games
        size = min(10_000, n_permutations - start)
        signs = rng.choice((1.0, -1.0), size=(size, len(diffs)))
        hits += int(np.sum(np.abs(signs @ diffs) / len(diffs) >= observed - _TOLERANCE))
    return (1 + hits) / (1 + n_permutations)


def interval_reading(low: float, high: float) -> str:
    return "above 0" if low > 0 else "below 0" if high < 0 else "contains 0"


def verdict(low: float, high: float, p: float, lower_is_better: bool = False) -> str:
    """The two-test rule: 'A better' or 'B better' only when the interval excludes 0 on that
    side AND p < ALPHA; otherwise 'not shown'."""
    if p >= ALPHA or low <= 0 <= high:
        return "not shown"
    a_higher = low > 0
    return "A better" if a_higher != lower_is_better else "B better"


def paired_counts(game_diffs: np.ndarray) -> tuple[int, int, int]:
    """Games where A is higher, lower, equal (mean over seeds)."""
    rounded = np.where(np.abs(game_diffs) < _TOLERANCE, 0.0, game_diffs)
    return int((rounded > 0).sum()), int((rounded < 0).sum()), int((rounded == 0).sum())


def seed_differences(episodes: pd.DataFrame, a: str, b: str, metric: str) -> list[list[float]]:
    """Per game, the A - B differences of `metric` of each seed where both methods finished
    the game's episode (`episodes`: method, seed, game_id, failed and the metrics)."""
    finished = episodes[~episodes["failed"].astype(bool)]
    wide = finished.pivot_table(
        index=["game_id", "seed"], columns="method", values=metric, aggfunc="mean"
    )
    if a not in wide or b not in wide:
        return []
    both = wide[[a, b]].dropna()
    diff = (both[a] - both[b]).groupby(level="game_id")
    return [list(values) for _, values in diff]


def paired_comparisons(
    episodes: pd.DataFrame,
    comparisons: Sequence[tuple[str, str]],
    metrics: Sequence[str] = METRICS,
    n_resamples: int = N_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> pd.DataFrame:
    """A - B per comparison and metric over the games both methods finished on some seed,
    with the bootstrap interval, the permutation p, the verdict and per-game counts."""
    rows = []
    for a, b in comparisons:
        for metric in metrics:
            diffs = seed_differences(episodes, a, b, metric)
            if not diffs:
                continue
            means = game_means(diffs)
            a_mean, b_mean = _method_means(episodes, a, b, metric)
            diff, low, high = hierarchical_bootstrap(diffs, n_resamples, seed)
            p = sign_flip_p(means)
            higher, lower, equal = paired_counts(means)
            rows.append(
                {
                    "comparison": f"{a} - {b}",
                    "metric": metric,
                    "games": len(diffs),
                    "a_mean": round(a_mean, 3),
                    "b_mean": round(b_mean, 3),
                    "mean_diff": round(diff, 3),
                    "ci_low": round(low, 3),
                    "ci_high": round(high, 3),
                    "ci": interval_reading(low, high),
                    "p": round(p, 5),
                    "verdict": verdict(low, high, p, metric in LOWER_IS_BETTER),
                    "a_higher": higher,
                    "a_lower": lower,
                    "equal": equal,
                }
            )
    return pd.DataFrame(rows)


def _method_means(episodes: pd.DataFrame, a: str, b: str, metric: str) -> tuple[float, float]:
    """Each method's mean over the paired games of its mean over the paired seeds."""
    finished = episodes[~episodes["failed"].astype(bool)]
    wide = finished.pivot_table(
        index=["game_id", "seed"], columns="method", values=metric, aggfunc="mean"
    )[[a, b]].dropna()
    per_game = wide.groupby(level="game_id").mean()
    return float(per_game[a].mean()), float(per_game[b].mean())
