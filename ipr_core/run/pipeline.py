"""Expert data and the step queries of the loop's stages (see `ipr_core.run.loop`).

Which expert trajectories a run trains on, and which steps the step reward stages score:
the expert steps a (run, scorer) has not scored yet (all, or those an agent step differs
from), and the agent's first own action of every exploration that differs from the expert's.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from ipr_core.config import RunConfig
from ipr_core.envs import make_env
from ipr_core.errors import InputError
from ipr_core.method.expert import Rejected, gold_trajectories
from ipr_core.method.explore import Exploration
from ipr_core.method.mining import StepKey
from ipr_core.method.step_rewards import StepQuery, expert_queries
from ipr_core.run.context import Log, RunContext
from ipr_core.store.store import At, Row, Store, expert_to_row
from ipr_core.types import EXPERT, Trajectory


@dataclass(frozen=True)
class GoldExperts:
    rows: list[Row]
    rejected: list[Rejected]

    @property
    def written(self) -> int:
        return len(self.rows)


def gold_experts(env_id: str, split: str, limit: int) -> GoldExperts:
    """`limit` verified expert trajectories of a split from the env's gold actions, as rows."""
    env = make_env(env_id)
    kept: list[Trajectory] = []
    rejected: list[Rejected] = []
    try:
        for built in gold_trajectories(env, split):
            if isinstance(built, Rejected):
                rejected.append(built)
            else:
                kept.append(built)
            if len(kept) >= limit:
                break
    finally:
        env.close()
    return GoldExperts([expert_to_row(t, source="gold") for t in kept], rejected)


def ingest_gold(
    store: Store, env_id: str, split: str, limit: int, replace: bool = False
) -> GoldExperts:
    """Build and store `limit` verified expert trajectories of a split; ids the store holds
    already are refused unless `replace` (as for a file, see `ingest_file`)."""
    gold = gold_experts(env_id, split, limit)
    if gold.rows:
        import_experts(store, gold.rows, f"gold trajectories of {env_id} {split}", replace)
    return gold


def ingest_file(
    store: Store, trajectories: Sequence[Trajectory], source: str, replace: bool = False
) -> tuple[int, int]:
    """Store imported expert trajectories (already validated whole) in one transaction;
    returns (written, replaced)."""
    rows = [expert_to_row(t, source=source) for t in trajectories]
    if not rows:
        return 0, 0
    return import_experts(store, rows, source, replace)


def import_experts(
    store: Store, rows: Sequence[Row], source: str, replace: bool
) -> tuple[int, int]:
    """Write expert rows of one env in one transaction; returns (written, replaced).

    Ids the store already holds for the env are refused unless `replace`: a silent
    overwrite would change what every later run of the env trains on."""
    written, existing = store.import_experts(rows, replace)
    if existing and not replace:
        shown = ", ".join(repr(task_id) for task_id in existing[:5])
        more = f" and {len(existing) - 5} more" if len(existing) > 5 else ""
        raise InputError(
            source,
            f"the store already holds {len(existing)} of these ids for "
            f"{rows[0]['env_id']} ({shown}{more}); pass --replace to replace them",
            field="id",
        )
    return written, len(existing)


def missing_expert_rows(store: Store, config: RunConfig, log: Log) -> list[Row]:
    """The gold expert rows to ingest when the store has fewer than `train_limit`."""
    if len(store.expert_trajectories(config.env, config.train_split)) >= config.train_limit:
        return []
    gold = gold_experts(config.env, config.train_split, config.train_limit)
    log(f"built {len(gold.rows)} expert trajectories ({len(gold.rejected)} rejected)")
    held = {t.task.task_id for t in store.expert_trajectories(config.env)}
    return [row for row in gold.rows if row["task_id"] not in held]  # stored rows stay


def ensure_experts(ctx: RunContext) -> list[Trajectory]:
    """The run's expert trajectories, ingested first where the store lacks them."""
    ctx.store.write({"expert_trajectories": missing_expert_rows(ctx.store, ctx.config, ctx.log)})
    return ctx.experts()


def pending_expert_queries(
    store: Store,
    at: At,
    scorer_id: str,
    experts: Sequence[Trajectory],
    compared: Collection[StepKey] | None = None,
) -> list[StepQuery]:
    """The expert steps this (run, scorer) has not scored by iteration `at.iteration`: all of
    them, or those in `compared` (`monte_carlo.expert_steps: compared`)."""
    done = store.step_reward_map(at, EXPERT, scorer_id)
    return [
        query
        for expert in experts
        for query in expert_queries(expert)
        if (key := (query.task_id, query.prefix_len)) not in done
        and (compared is None or key in compared)
    ]


def agent_queries(explorations: Sequence[Exploration]) -> list[StepQuery]:
    """The agent's first own action of every exploration that differs from the expert's."""
    return [q for e in explorations if (q := e.agent_step_query()) is not None]


def compared_steps(store: Store, at: At, experts: Sequence[Trajectory]) -> set[StepKey]:
    """The expert steps an iteration's agent steps are compared with: where its explorations'
    first own action differs from the expert's (mining reads an expert reward nowhere else)."""
    explorations = store.explorations(at.run_id, at.iteration, experts)
    return {(q.task_id, q.prefix_len) for q in agent_queries(explorations)}
