"""The Monte Carlo and exploration stages commit their rows in chunks: a stage killed after
some chunks resumes from the last one, and its rows and cost equal an uninterrupted run's."""

import pytest

from ipr_core.config import RunConfig
from ipr_core.run import loop
from ipr_core.run.context import RunContext, score_in_process
from ipr_core.run.loop import (
    AGENT_STEP_REWARDS,
    EVALUATE,
    EXPERT_STEP_REWARDS,
    EXPLORE,
    Iteration,
    run_stage,
)
from ipr_core.run.pipeline import ingest_gold
from ipr_core.store.store import Store, partial_name

ENV = "twx/arithmetic"
COMPARED = ("step_rewards", "rollouts")


def table(store: Store, name: str) -> list[dict]:
    """Rows in a stable order, without what depends on when and in which process they were
    made (`prefill_tokens` counts prompt tokens missed by the prefix cache)."""
    excluded = "created_at, prefill_tokens" if name == "rollouts" else "created_at"
    return store.query(f"SELECT * EXCLUDE ({excluded}) FROM {name} ORDER BY ALL").to_dict("records")


def quiet(_: str) -> None:
    pass


class Killed(Exception):
    """Stands in for the process dying between two chunks."""


class Scoring:
    """In-process scoring that records each chunk's query count and can die at a call."""

    def __init__(self, die_at: int | None = None):
        self.die_at, self.chunks = die_at, []

    def __call__(self, engines, job, label):
        if len(self.chunks) == self.die_at:
            raise Killed
        self.chunks.append(len(job.queries))
        return score_in_process(engines, job, label)


class Dying:
    """Wraps one of the loop's chunk functions (explore, evaluate): records the size of each
    chunk (its argument `chunk_arg`: the experts, the task ids) and dies at call `die_at`."""

    def __init__(self, monkeypatch, name: str, chunk_arg: int):
        self.inner, self.chunk_arg = getattr(loop, name), chunk_arg
        self.reset(die_at=None)
        monkeypatch.setattr(loop, name, self)

    def __call__(self, *args):
        if len(self.calls) == self.die_at:
            raise Killed
        self.calls.append(len(args[self.chunk_arg]))
        return self.inner(*args)

    def reset(self, die_at: int | None) -> None:
        self.calls: list[int] = []
        self.die_at = die_at


@pytest.fixture
def setup(tmp_path, tiny_model_path, two_task_mc_config):
    """Two stores holding the same 2 experts; 3 queries per chunk (2 live sets of 3
    rollouts, N = 2)."""
    config = two_task_mc_config("chunks", tmp_path / "a.duckdb", max_live=3)
    stores = []
    for name in ("a", "b"):
        store = Store(tmp_path / f"{name}.duckdb")
        ingest_gold(store, ENV, "train", 2)
        stores.append(store)
    return config, stores, Iteration(1, tiny_model_path, tiny_model_path)


def context(config: RunConfig, store: Store, scoring: Scoring) -> RunContext:
    return RunContext(
        config.model_copy(update={"store": store.path}), store, quiet, scoring=scoring
    )


def partial(store: Store, stage: str, iteration: int):
    return store.stage_record("chunks", iteration, partial_name(stage))


def test_a_killed_expert_stage_resumes_from_its_last_chunk(setup):
    config, (whole, killed), it = setup
    uninterrupted = Scoring()
    full = run_stage(EXPERT_STEP_REWARDS, context(config, whole, uninterrupted), it)
    assert uninterrupted.chunks == [3, 3, 3, 1] and full.queries == 10

    with pytest.raises(Killed):
        run_stage(EXPERT_STEP_REWARDS, context(config, killed, Scoring(die_at=2)), it)
    left = partial(killed, "expert-step-rewards", 0)
    assert left.result["units"] == 6 and killed.count("step_rewards") == 6
    assert killed.stage_record("chunks", 0, "expert-step-rewards") is None

    resumed = Scoring()
    result = run_stage(EXPERT_STEP_REWARDS, context(config, killed, resumed), it)
    assert resumed.chunks == [3, 1]  # the committed chunks are not scored again
    assert result == full  # 10 steps scored, over both attempts
    for name in COMPARED:
        assert table(killed, name) == table(whole, name)
    assert partial(killed, "expert-step-rewards", 0) is None
    [cost_whole] = whole.query("SELECT * FROM stage_costs").to_dict("records")
    [cost_resumed] = killed.query("SELECT * FROM stage_costs").to_dict("records")
    for key in ("rollouts", "generated_tokens", "env_steps"):  # both attempts counted
        assert cost_resumed[key] == cost_whole[key] > 0, key
    assert cost_resumed["wall_s"] > left.result["wall_s"] > 0


def test_chunks_of_other_inputs_are_thrown_away_and_the_stage_starts_afresh(setup):
    """An agent stage's chunks committed for other explorations (another fingerprint) are
    deleted with their partial record before the stage scores anything."""
    config, (whole, killed), it = setup
    for store in (whole, killed):
        run_stage(EXPLORE, context(config, store, Scoring()), it)
    uninterrupted = Scoring()
    full = run_stage(AGENT_STEP_REWARDS, context(config, whole, uninterrupted), it)
    assert len(uninterrupted.chunks) > 1, "needs more than one chunk"

    with pytest.raises(Killed):
        run_stage(AGENT_STEP_REWARDS, context(config, killed, Scoring(die_at=1)), it)
    assert killed.count("step_rewards", "actor = 'agent'") == uninterrupted.chunks[0]
    with killed.transaction() as con:
        con.execute("UPDATE stage_runs SET fingerprint = 'other' WHERE stage LIKE '%.partial'")

    afresh = Scoring()
    assert run_stage(AGENT_STEP_REWARDS, context(config, killed, afresh), it) == full
    assert afresh.chunks == uninterrupted.chunks  # every step scored again
    for name in COMPARED:
        assert table(killed, name) == table(whole, name)
    assert partial(killed, "agent-step-rewards", 1) is None


def test_called_alone_a_stage_returns_every_chunks_rows(setup):
    """Outside `run_stage` (no chunk log) nothing is committed: the rows are returned."""
    config, (store, _), it = setup
    scoring = Scoring()
    output = EXPERT_STEP_REWARDS.compute(context(config, store, scoring), it)
    assert scoring.chunks == [3, 3, 3, 1]
    assert len(output.rows["step_rewards"]) == 10 and store.count("step_rewards") == 0


@pytest.mark.parametrize(
    "stage, function, chunk_arg, chunks, compared",
    [
        # whole experts per chunk: 2 live episodes x 2 = 4 episodes, one 5-step expert each
        (EXPLORE, "explore", 1, [1, 1], ("rollouts",)),
        # 4 of the 6 dev tasks, then 2; the evaluation row summarises all 6 episodes
        (EVALUATE, "evaluate", 2, [4, 2], ("rollouts", "evaluations")),
    ],
    ids=["exploration", "evaluation"],
)
def test_a_killed_rollout_stage_resumes_with_the_work_it_had_not_done(
    setup, monkeypatch, stage, function, chunk_arg, chunks, compared
):
    config, (whole, killed), it = setup
    generation = config.generation.model_copy(update={"max_live_episodes": 2})
    config = config.model_copy(update={"generation": generation, "dev_limit": 6})
    chunked = Dying(monkeypatch, function, chunk_arg)
    full = run_stage(stage, context(config, whole, Scoring()), it)
    assert chunked.calls == chunks

    chunked.reset(die_at=1)
    with pytest.raises(Killed):
        run_stage(stage, context(config, killed, Scoring()), it)
    assert killed.count("stage_runs", "stage NOT LIKE '%.partial'") == 0  # not complete

    chunked.reset(die_at=None)
    assert run_stage(stage, context(config, killed, Scoring()), it) == full
    assert chunked.calls == chunks[1:]  # the first chunk was committed
    for name in compared:
        assert table(killed, name) == table(whole, name)
    assert killed.count("stage_runs", "stage LIKE '%.partial'") == 0
    [cost] = killed.query("SELECT rollouts FROM stage_costs").to_dict("records")
    assert cost["rollouts"] == sum(chunks) * (5 if stage is EXPLORE else 1)
