"""Integration: the IPR data pipeline on TextWorldExpress with the tiny local Llama."""

import functools
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from flows.commands import main
from ipr_core.agent.prompts import PromptFormat, build_conversation
from ipr_core.agent.react import format_turn
from ipr_core.engine.backends import make_backend
from ipr_core.engine.backends.base import SamplingParams
from ipr_core.engine.rollout import EpisodeConfig, RolloutEngine, RolloutSpec
from ipr_core.errors import InputError
from ipr_core.method.explore import explore
from ipr_core.method.step_rewards import StepQuery, estimate_step_rewards
from ipr_core.run import loop
from ipr_core.run.context import Engines, RunContext, action_hint
from ipr_core.run.direct import run_pipeline
from ipr_core.run.pipeline import ensure_experts, ingest_gold
from ipr_core.store.store import At, Store
from ipr_core.training.checkpoints import model_id
from ipr_core.training.reward_model import (
    RewardModelConfig,
    step_reward_examples,
    train_reward_model,
)
from ipr_core.types import AGENT, EXPERT

ROOT = Path(__file__).resolve().parents[1]
ENV = "twx/twc"


def test_ingest_cli_writes_verified_expert_trajectories(tmp_path, capsys):
    store_path = tmp_path / "x.duckdb"
    env = "twx/cookingworld"
    args = ["ingest", "--env", env, "--split", "train", "--limit", "3", "--store", str(store_path)]
    assert main(args) == 0
    experts = Store(store_path).expert_trajectories(env, "train")
    assert len(experts) == 3
    assert all(t.outcome_reward == 1.0 and t.steps for t in experts)
    assert all(s.text.startswith("Thought: ") and "\nAction: " in s.text for s in experts[0].steps)


def test_unknown_env_is_a_clear_error(tmp_path, capsys):
    assert main(["ingest", "--env", "nope/x", "--store", str(tmp_path / "s.duckdb")]) == 2
    assert "nope/x" in capsys.readouterr().err


def test_pipeline_fills_every_table(smoke_run):
    config, store, summary = smoke_run
    experts = store.expert_trajectories(config.env, "train")
    total_steps = sum(len(e.steps) for e in experts)
    explorations = store.count("rollouts", "kind = 'explore'")
    assert explorations == total_steps  # one greedy episode per expert prefix j = 0..K-1
    assert store.count("step_rewards", "actor = 'expert'") == total_steps
    assert store.count("pairs", "level = 'trajectory'") >= 1
    assert store.count("pairs", "level = 'step'") >= 1
    # -1 base model, 0 SFT model (and the expert steps, scored once), 1 first IPR iteration
    assert list(summary["iteration"]) == [-1, 0, 1]
    tokens = store.query("SELECT min(prefill_tokens) AS p, min(generated_tokens) AS g "
                         "FROM rollouts WHERE kind = 'explore'")  # fmt: skip
    assert tokens["p"][0] > 0 and tokens["g"][0] > 0


def test_each_training_step_is_in_the_store_with_its_terms_and_diagnostics(smoke_run):
    """Committed with the training stages: SFT steps' loss, and each mixture step's loss,
    SFT term and, per DPO level, loss, margin, log-ratios and accuracy."""
    _, store, _ = smoke_run
    steps = store.query(
        "SELECT s.*, c.path FROM training_steps s JOIN checkpoints c USING (checkpoint_id) "
        "WHERE s.run_id = 'smoke' ORDER BY s.iteration, s.step"
    )
    sft, mixture = steps[steps.kind == "sft"], steps[steps.kind == "mixture"]
    assert list(sft.iteration.unique()) == [0] and list(mixture.iteration.unique()) == [1]
    assert list(mixture.step) == list(range(1, len(mixture) + 1))
    assert sft[["loss", "sft_loss", "grad_norm", "learning_rate"]].notna().all().all()
    assert mixture[["loss", "sft_loss", "grad_norm"]].notna().all().all()
    for level in ("o_dpo", "s_dpo"):  # the smoke run mines pairs of both levels
        columns = [f"{level}_{m}" for m in ("loss", "margin", "chosen_logratio",
                                             "rejected_logratio", "accuracy")]  # fmt: skip
        with_pairs = mixture[mixture[f"{level}_pairs"] > 0]
        assert not with_pairs.empty and with_pairs[columns].notna().all().all()
    for path in steps.path.unique():
        assert list((Path(path).parent / "tensorboard").glob("events.out.tfevents.*"))


def test_terminal_expert_step_reward_is_the_outcome(smoke_run):
    _, store, _ = smoke_run
    last = store.query(
        "SELECT s.mean_reward, s.n_samples, s.terminal FROM step_rewards s "
        "JOIN expert_trajectories e USING (task_id) "
        "WHERE s.actor = 'expert' AND s.prefix_len = e.n_steps - 1"
    )
    assert len(last) == 2
    assert (last["mean_reward"] == 1.0).all() and last["terminal"].all()
    assert (last["n_samples"] == 1).all()  # nothing sampled after a terminal action
    inner = store.query(
        "SELECT n_samples, terminal FROM step_rewards s JOIN expert_trajectories e "
        "USING (task_id) WHERE s.actor = 'expert' AND s.prefix_len < e.n_steps - 1"
    )
    assert (inner["n_samples"] == 2).all() and not inner["terminal"].any()


def test_mc_reward_is_the_mean_of_its_stored_rollouts(smoke_run):
    _, store, _ = smoke_run
    check = store.query(
        "SELECT s.mean_reward, avg(r.outcome_reward) AS mean_of_rollouts "
        "FROM step_rewards s JOIN rollouts r ON r.kind = 'mc' AND r.task_id = s.task_id "
        "AND r.prefix_len = s.prefix_len AND r.actor = s.actor AND r.iteration = s.iteration "
        "GROUP BY ALL"
    )
    assert len(check) > 0
    assert ((check["mean_reward"] - check["mean_of_rollouts"]).abs() < 1e-9).all()


def test_evaluations_cover_base_sft_and_iteration_models(smoke_run):
    _, store, _ = smoke_run
    rows = store.query(
        "SELECT e.iteration, c.kind FROM evaluations e JOIN checkpoints c "
        "ON c.checkpoint_id = e.policy_id ORDER BY e.iteration"
    )
    assert list(rows.itertuples(index=False, name=None)) == [
        (-1, "base"),
        (0, "sft"),
        (1, "mixture"),
    ]
    eval_rollouts = store.count("rollouts", "kind = 'eval'")
    assert eval_rollouts == 3 * 2  # three models, dev_limit 2


def test_scorer_is_the_sft_model_and_reference_stays_sft(smoke_run):
    _, store, _ = smoke_run
    sft_id = store.query("SELECT checkpoint_id FROM checkpoints WHERE kind = 'sft'").iloc[0, 0]
    scorers = store.query("SELECT DISTINCT scorer_id FROM step_rewards")["scorer_id"].tolist()
    assert scorers == [sft_id]
    mixture = store.query("SELECT parent_id FROM checkpoints WHERE kind = 'mixture'")
    assert mixture.iloc[0, 0] == sft_id


def test_expert_step_rewards_are_computed_once_per_run_and_scorer(smoke_run):
    config, store, _ = smoke_run
    before = store.count("rollouts", "kind = 'mc' AND actor = 'expert'")
    sft = Path(store.query("SELECT path FROM checkpoints WHERE kind = 'sft'")["path"][0])
    ctx = RunContext(config, store, log=lambda _: None)
    output = loop.EXPERT_STEP_REWARDS.compute(ctx, loop.Iteration(2, sft, sft))
    assert output.result.queries == 0 and output.rows == {}
    assert store.count("rollouts", "kind = 'mc' AND actor = 'expert'") == before


def test_compared_expert_steps_are_the_ones_mining_reads_and_keep_the_pairs(smoke_run, tmp_path):
    """monte_carlo.expert_steps: compared scores, after an iteration's exploration, only the
    expert steps its agent steps differ from, with the samples `all` drew for them (seeded by
    query and sample), so mining makes `all`'s pairs; a later iteration scores only steps no
    earlier one did."""
    config, store, _ = smoke_run
    copy = Store(store.copy_to(tmp_path / "compared.duckdb"))
    monte_carlo = config.monte_carlo.model_copy(update={"expert_steps": "compared"})
    compared = config.model_copy(update={"store": copy.path, "monte_carlo": monte_carlo})
    [scorer] = copy.scorer_ids(config.run_id)
    # `all`: every expert step
    everything = copy.step_reward_map(At(config.run_id, 0), EXPERT, scorer)
    # the tiny model's steps differ from every expert step: keep one task's explorations
    kept = min(key[0] for key in everything)
    pair_columns = "level, task_id, prefix_len, chosen, rejected, chosen_reward, rejected_reward"
    pairs_sql = f"SELECT {pair_columns} FROM pairs WHERE task_id = ? ORDER BY ALL"
    pairs = copy.query(pairs_sql, [kept])
    with copy.transaction() as con:  # and as if the run had scored no expert step yet
        con.execute("DELETE FROM rollouts WHERE iteration = 1 AND task_id != ?", [kept])
        con.execute("DELETE FROM step_rewards WHERE iteration = 1 AND task_id != ?", [kept])
        con.execute("DELETE FROM step_rewards WHERE actor = 'expert'")
        con.execute("DELETE FROM rollouts WHERE actor = 'expert' AND kind = 'mc'")
    sft = Path(copy.query("SELECT path FROM checkpoints WHERE kind = 'sft'")["path"][0])
    logs: list[str] = []
    ctx = RunContext(compared, copy, log=logs.append)
    first = loop.Iteration(1, sft, sft)
    stage = loop.expert_step_rewards(ctx)

    scored = loop.run_stage(stage, ctx, first).queries
    compared_steps = set(copy.step_reward_map(At(config.run_id, 1), AGENT, scorer))
    rewards = copy.step_reward_map(At(config.run_id, 1), EXPERT, scorer)
    assert scored == len(rewards) == len(compared_steps) < len(everything)
    assert rewards == {key: everything[key] for key in compared_steps}
    assert copy.count("step_rewards", "actor = 'expert' AND iteration = 1") == scored
    loop.run_stage(loop.MINE_PAIRS, ctx, first)
    assert copy.query(pairs_sql, [kept]).equals(pairs) and not pairs.empty
    loop.run_stage(stage, ctx, first)
    assert logs[-1].startswith("expert step rewards[1]: done before")

    # iteration 2 explores as iteration 1 did: every step it compares was scored before
    with copy.transaction() as con:
        con.execute(
            "INSERT INTO rollouts SELECT * REPLACE (2 AS iteration) FROM rollouts "
            "WHERE iteration = 1 AND kind = 'explore'"
        )
    assert loop.run_stage(stage, ctx, loop.Iteration(2, sft, sft)).queries == 0
    assert copy.step_reward_map(At(config.run_id, 2), EXPERT, scorer) == rewards


def test_an_exploration_that_takes_the_experts_action_ends_there_when_cut(
    smoke_run, tiny_model_path
):
    """cut_explorations: an episode after an expert prefix ends at its first action when it
    is the expert's (status cut, no outcome); every other episode is the one it would be."""
    config, store, _ = smoke_run
    experts = store.expert_trajectories(config.env, "train")
    episode = EpisodeConfig(max_new_tokens=16, max_steps=config.max_steps)
    with RolloutEngine(config.env, make_backend(tiny_model_path), episode) as engine:
        full = explore(engine, experts)
        # the tiny model never takes an expert's action, so nothing is cut...
        uncut = [e.rollout.trajectory for e in explore(engine, experts, cut=True)]
        assert uncut == [e.rollout.trajectory for e in full]
        # ...until the action it takes is the one named: every other later exploration
        later = [e for e in full if e.prefix_len > 0]
        cut = [
            replace(e.rollout.spec, cut_if_action=e.rollout.policy_steps[0].action)
            if i % 2 == 0
            else e.rollout.spec
            for i, e in enumerate(later)
        ]
        results = engine.run(cut, temperature=0.0)
    for i, (exploration, result) in enumerate(zip(later, results, strict=True)):
        if i % 2:
            assert result.trajectory == exploration.rollout.trajectory
            continue
        assert (result.status, result.outcome_reward) == ("cut", None)
        whole = exploration.rollout.trajectory.steps
        assert result.trajectory.steps == whole[: exploration.prefix_len + 1] != whole


def test_rerun_changes_no_row_count(smoke_run):
    config, store, _ = smoke_run
    tables = ["expert_trajectories", "rollouts", "step_rewards", "pairs"]
    before = {t: store.count(t) for t in tables}
    run_pipeline(config, log=lambda _: None)
    assert {t: store.count(t) for t in tables} == before


def test_context_overflow_is_a_failed_rollout_not_reward_zero(tmp_path, tiny_model_path):
    store = Store(tmp_path / "s.duckdb")
    ingest_gold(store, ENV, "train", 1)
    [expert] = store.expert_trajectories(ENV, "train")
    backend = make_backend(tiny_model_path, max_context=64)  # no prompt fits
    with RolloutEngine(ENV, backend, EpisodeConfig(max_new_tokens=8)) as engine:
        query = StepQuery(expert.task.task_id, "expert", (), expert.steps[0].text)
        [reward], [rollouts] = estimate_step_rewards(engine, [query], n_samples=3)
    assert [r.status for r in rollouts] == ["truncated"] * 3
    assert all(r.outcome_reward is None for r in rollouts)
    assert reward.mean_reward is None and reward.n_failed == 3


@dataclass
class FailingBackend:
    """Fault injection around the real backend: the second generate call raises."""

    inner: object
    calls: int = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, conversations, params: SamplingParams):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("out of memory")
        return self.inner.generate(conversations, params)


def test_generation_error_marks_live_episodes_failed(tiny_model_path):
    backend = FailingBackend(make_backend(tiny_model_path))
    with RolloutEngine(ENV, backend, EpisodeConfig(max_new_tokens=8)) as engine:
        task_ids = engine.task_ids("train")[:2]
        results = engine.run([RolloutSpec(t) for t in task_ids], temperature=0.0)
    assert [r.status for r in results] == ["generation_error"] * 2
    assert all(r.outcome_reward is None and "out of memory" in r.error for r in results)
    assert all(len(r.trajectory.steps) == 1 for r in results)


def test_engine_runs_more_episodes_than_live_slots_in_order(tiny_model_path):
    backend = make_backend(tiny_model_path)
    progress: list[tuple[int, int]] = []
    settings = EpisodeConfig(max_live=2, max_new_tokens=8)
    with RolloutEngine(ENV, backend, settings, progress=lambda *p: progress.append(p)) as engine:
        task_ids = engine.task_ids("dev")[:5]
        specs = [RolloutSpec(t) for t in task_ids]
        results = engine.run(specs, temperature=0.0)
        again = engine.run(list(reversed(specs)), temperature=0.0)
    assert progress == [(k, 5) for k in range(1, 6)] * 2  # one report per finished episode
    assert [r.spec.task_id for r in results] == task_ids
    # greedy decoding: the same task gives the same episode whatever the batch around it
    assert [r.trajectory for r in results] == [r.trajectory for r in reversed(again)]
    assert all(r.status in ("ok", "max_steps") for r in results)


@dataclass
class RoundRecorder:
    """The real backend, logging each round's number of episodes beside finished ones."""

    inner: object
    events: list[int]
    """Rows of a generate call, or 0 for an episode that finished."""

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, conversations, params: SamplingParams, seeds=None):
        self.events.append(len(conversations))
        return self.inner.generate(conversations, params, seeds)


def test_finished_episodes_free_their_slot_for_the_next_round(tiny_model_path):
    """Continuous admission: each round runs min(max_live, not yet finished) episodes, so
    the batch does not drain while rollouts are pending."""
    events: list[int] = []
    backend = RoundRecorder(make_backend(tiny_model_path), events)
    settings = EpisodeConfig(max_live=3, max_new_tokens=8, max_steps=3)
    with RolloutEngine(ENV, backend, settings, progress=lambda *_: events.append(0)) as engine:
        specs = [RolloutSpec(engine.task_ids("dev")[0], (), k) for k in range(7)]
        results = engine.run(specs, temperature=1.0, seed=3)
    finished, rounds = 0, 0
    for rows in events:
        if rows == 0:
            finished += 1
        else:
            rounds += 1
            assert rows == min(3, len(specs) - finished)
    assert finished == len(specs) and rounds > 3
    assert sum(events) == sum(len(r.policy_steps) for r in results)  # one row per policy step


def test_replay_reaches_the_expert_outcome(tmp_path, tiny_model_path):
    store = Store(tmp_path / "s.duckdb")
    ingest_gold(store, ENV, "train", 1)
    [expert] = store.expert_trajectories(ENV, "train")
    with RolloutEngine(ENV, make_backend(tiny_model_path)) as engine:
        result, ended = engine.replay(expert.task.task_id, [s.text for s in expert.steps])
        partial, partial_ended = engine.replay(expert.task.task_id, [expert.steps[0].text])
    assert ended and result.outcome_reward == 1.0
    assert result.trajectory.steps == expert.steps
    assert not partial_ended and partial.trajectory.steps == expert.steps[:1]
    assert replace(result.spec, prefix=()) == RolloutSpec(expert.task.task_id)


def test_a_step_reward_model_replaces_monte_carlo(smoke_run, tiny_model_path, tmp_path):
    """Paper 5.5: a reward model trained on the run's MC step rewards scores new steps."""
    config, store, _ = smoke_run
    [mc_scorer] = store.query("SELECT DISTINCT scorer_id FROM step_rewards")["scorer_id"]
    steps = store.scored_steps(config.run_id, mc_scorer)
    examples = step_reward_examples(steps, PromptFormat(action_hint(config.env)))
    settings = RewardModelConfig(epochs=1, batch_size=8, max_length=2048, heldout_fraction=0.0)
    trained = train_reward_model(tiny_model_path, examples, settings, tmp_path / "checkpoints")
    rm_config = config.model_copy(update={"step_reward_model": trained.path})
    scorer = Engines(rm_config).scorer(tiny_model_path, 1)
    scorer_id, reward_model = scorer.scorer_id, scorer.reward_model
    assert scorer_id == model_id(trained.path) != mc_scorer
    # one switch: from iteration 2 on, after MC in iteration 1 (the model learns from it)
    later = Engines(rm_config.model_copy(update={"step_reward_model_from": 2}))
    first, second = later.scorer(tiny_model_path, 1), later.scorer(tiny_model_path, 2)
    assert first.reward_model is None
    assert first.scorer_id == Engines(config).scorer_id(tiny_model_path, 1)
    assert second.reward_model is not None and second.scorer_id == scorer_id

    fresh = Store(tmp_path / "rm.duckdb")
    ingest_gold(fresh, config.env, "train", 2)
    experts = fresh.expert_trajectories(config.env, "train")
    rm_run = rm_config.model_copy(update={"run_id": "rm-run", "train_limit": 2})
    ctx = RunContext(rm_run, fresh, log=lambda _: None)
    it = loop.Iteration(1, tiny_model_path, tiny_model_path)
    computed = loop.run_stage(loop.EXPERT_STEP_REWARDS, ctx, it).queries
    rows = fresh.query(
        "SELECT task_id, prefix_len, step_text, mean_reward, n_samples, terminal "
        "FROM step_rewards WHERE scorer_id = ? ORDER BY task_id, prefix_len",
        [scorer_id],
    )
    assert computed == len(rows) == sum(len(e.steps) for e in experts)
    by_task = {e.task.task_id: e for e in experts}
    for row in rows.itertuples():
        expert = by_task[row.task_id]
        if row.terminal:  # the last step's reward is the outcome, as with MC
            assert row.mean_reward == expert.outcome_reward and row.n_samples == 1
            continue
        messages = build_conversation(
            expert.task, expert.steps[: row.prefix_len], PromptFormat(action_hint(config.env))
        )
        predicted = reward_model.score(
            [[*messages, {"role": "assistant", "content": row.step_text}]]
        )
        assert row.n_samples == 0 and row.mean_reward == pytest.approx(predicted[0], abs=1e-5)
    # nothing was sampled: the only scorer rollouts are the replays of the terminal steps
    assert fresh.count("rollouts", "kind = 'mc'") == int(rows["terminal"].sum())


def test_a_missing_step_reward_model_names_the_field(smoke_run, tmp_path):
    config, _, _ = smoke_run
    missing = config.model_copy(update={"step_reward_model": tmp_path / "nowhere"})
    with pytest.raises(InputError, match="step_reward_model"):
        Engines(missing).scorer(tmp_path / "sft", 1)


def test_early_stopped_monte_carlo_draws_a_prefix_of_the_samples_and_keeps_the_pairs(
    tiny_model_path,
):
    """monte_carlo.early_stop: each query's samples are the first k of the full run's (the
    same rollouts), the pair decision is the full run's, and fewer rollouts are drawn."""
    from ipr_core.config import MiningConfig
    from ipr_core.method.mining import PairContext, pair_decided, step_winner

    mining = MiningConfig(step_margin=0.1)
    with RolloutEngine(
        ENV, make_backend(tiny_model_path), EpisodeConfig(max_new_tokens=8, max_steps=3)
    ) as engine:
        task_id = engine.task_ids("train")[0]
        queries = [
            StepQuery(task_id, "agent", (), format_turn("look", action))
            for action in ("look", "inventory", "go north")
        ]
        contexts = [
            PairContext(1.0, 1.0, 0.0),
            PairContext(0.5, 1.0, 0.0),
            PairContext(0.2, 1.0, 0.0),
        ]
        stops = [functools.partial(pair_decided, c, mining) for c in contexts]
        full_rewards, full = estimate_step_rewards(engine, queries, 4, 1.0, 7)
        early_rewards, early = estimate_step_rewards(engine, queries, 4, 1.0, 7, stops)
    for context, f, e, fr, er in zip(
        contexts, full, early, full_rewards, early_rewards, strict=True
    ):
        assert [r.trajectory for r in e] == [r.trajectory for r in f[: len(e)]]
        winners = [
            step_winner(context.expert_reward, reward.mean_reward, 1.0, 0.0, mining)
            for reward in (er, fr)
        ]
        assert winners[0] == winners[1]
    assert sum(map(len, early)) < sum(map(len, full))


def test_a_runs_experts_do_not_depend_on_what_else_its_store_holds(smoke_run, tmp_path):
    """Another run's larger train_limit stores more gold experts; a run with the smaller
    limit still trains on the split's first games (task ids sort 'train-10' before
    'train-2', so the first k stored by id were other games, and its SFT data changed)."""
    config, _, _ = smoke_run
    store = Store(tmp_path / "shared.duckdb")
    larger = config.model_copy(update={"store": tmp_path / "shared.duckdb", "train_limit": 12})
    ensure_experts(RunContext(larger, store, log=lambda _: None))
    ctx = RunContext(larger.model_copy(update={"train_limit": 4}), store)
    first = ctx.engines.task_ids(config.train_split)[:4]
    assert sorted(e.task.task_id for e in ctx.experts()) == sorted(first)
    stored = sorted(e.task.task_id for e in store.expert_trajectories(config.env))
    assert len(stored) == 12 and stored[:4] != sorted(first)  # what the old rule took
