"""`ipr report`: an experiment's results as markdown, generated from SQL over the store.

Every table in the report is the result of the query printed under it, run as printed
(the experiment id is written into the SQL text, not bound as a parameter), so a reader
can paste any query into `ipr sql` and get the same numbers. The exceptions: the paired
statistics, computed by `flows.stats` (pure functions) from a printed query's output, with
the function, seeds and resamples named; and the config's commits, read from git. The
closing analysis is computed from those tables, never written by hand.
"""

from __future__ import annotations

import json
import math
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from flows.plots import plot_dev_curve, training_steps_png
from flows.stats import (
    ALPHA,
    BOOTSTRAP_SEED,
    MAX_EXACT_GAMES,
    N_PERMUTATIONS,
    N_RESAMPLES,
    PERMUTATION_SEED,
    paired_comparisons,
)
from ipr_core.config import read_yaml_mapping
from ipr_core.errors import InputError
from ipr_core.run.experiment import ExperimentConfig, ensure_known, load_experiment_config
from ipr_core.store.report_queries import (
    ACTIONS_SQL,
    COMPARED,
    DEV_ACTIONS_SQL,
    DEV_CURVE_SQL,
    EPISODES_SQL,
    MANIFESTS_SQL,
    METHOD_COSTS_SQL,
    PER_SEED_SQL,
    RESULTS_SQL,
    SAME_TRANSCRIPTS_SQL,
    SETTINGS_SQL,
    STEP_ACCURACY_OVERALL_SQL,
    STEP_ACCURACY_SQL,
    STEP_REWARD_DISTRIBUTION_SQL,
    TEST_EVALUATIONS_SQL,
    TRAINING_CURVE_SQL,
    TRAINING_DATA_SQL,
    TRAINING_STEPS_SQL,
    per_game_diff_sql,
)
from ipr_core.store.store import Store
from ipr_core.training.methods import ETO, IPR, REGISTRY, RFT, SFT
from ipr_core.types import FAILED_STATUSES

RFT_FEW_SUCCESSES = 0.1
"""Below this share of its training data from its own successes, the report calls RFT
mostly further SFT."""


@dataclass(frozen=True)
class Table:
    """A query as run and shown, and its result."""

    sql: str
    frame: pd.DataFrame

    def markdown(self) -> str:
        return f"{markdown_table(self.frame)}\n\n```sql\n{self.sql.strip()}\n```"


def sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def run_query(store: Store, template: str, experiment_id: str) -> Table:
    sql = template.replace("{exp}", sql_literal(experiment_id))
    return Table(sql=sql, frame=store.query(sql))


def format_value(value: object) -> str:
    """One cell: NULL for missing values, floats without trailing zeros."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "NULL"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def markdown_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "(no rows)"
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    for row in frame.astype(object).itertuples(index=False):
        lines.append("| " + " | ".join(format_value(v) for v in row) + " |")
    return "\n".join(lines)


def write_report(store: Store, experiment_id: str, out: Path) -> list[Path]:
    """Write the markdown report and its figures beside it; returns the figures' paths."""
    ensure_known(store, experiment_id)
    settings = run_query(store, SETTINGS_SQL, experiment_id)
    results = run_query(store, RESULTS_SQL, experiment_id)
    per_seed = run_query(store, PER_SEED_SQL, experiment_id)
    curve = run_query(store, DEV_CURVE_SQL, experiment_id)
    dev_actions = run_query(store, DEV_ACTIONS_SQL, experiment_id)
    training_data = run_query(store, TRAINING_DATA_SQL, experiment_id)
    training = run_query(store, TRAINING_STEPS_SQL, experiment_id)
    training_curve = run_query(store, TRAINING_CURVE_SQL, experiment_id)
    accuracy = run_query(store, STEP_ACCURACY_SQL, experiment_id)
    costs = run_query(store, METHOD_COSTS_SQL, experiment_id)
    distribution = run_query(store, STEP_REWARD_DISTRIBUTION_SQL, experiment_id)
    overall = run_query(store, STEP_ACCURACY_OVERALL_SQL, experiment_id)
    episodes = run_query(store, EPISODES_SQL, experiment_id)
    same_transcripts = run_query(store, SAME_TRANSCRIPTS_SQL, experiment_id)
    actions = run_query(store, ACTIONS_SQL, experiment_id)
    manifests = run_query(store, MANIFESTS_SQL, experiment_id).markdown()
    tests = run_query(store, TEST_EVALUATIONS_SQL, experiment_id)
    diffs = run_query(store, per_game_diff_sql(list(episodes.frame["method"])), experiment_id)
    mismatches = episode_mismatches(episodes.frame, results.frame)
    paired = pd.DataFrame() if mismatches else paired_comparisons(episodes.frame, COMPARED)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot = out.with_name(f"{out.stem}-dev-reward.png")
    plot_dev_curve(curve.frame, plot, experiment_id)
    training_plot = out.with_name(f"{out.stem}-training-steps.png")
    training_plot.write_bytes(
        training_steps_png(
            training_curve.frame, f"Mixture training steps, experiment {experiment_id}"
        )
    )
    sections = [
        f"# Results of experiment `{experiment_id}`",
        f"Generated by `ipr report --experiment {experiment_id}` from the store "
        f"`{store.path}`. Every table is the result of the SQL query printed under it, "
        'exactly as it was run; paste one into `ipr sql "..." --store '
        f"{store.path}` to check it.",
        coverage(experiment_id, per_seed.frame),
        "## Settings",
        settings.markdown(),
        "## Test results per method",
        "Each run picks its best iteration on the dev split (highest dev reward) and that "
        "model is evaluated once on the test split; SFT is iteration 0. "
        + iteration_rule(settings.frame)
        + " Mean, sample standard deviation and min-max over seeds.",
        results.markdown(),
        "## Per seed",
        per_seed.markdown(),
        "## Dev reward by iteration",
        f"Iteration 0 is {sft_models(settings.frame)} (iteration -1 the base model, if "
        "evaluated); error bars span min-max over seeds.",
        f"![dev reward by iteration]({plot.name})",
        curve.markdown(),
        "### Actions on the dev games by iteration",
        "What each iteration's model did on the dev games: the share of its actions by first "
        "word, pooled over seeds (failed episodes left out). A jump in the dev curve shows "
        "here as a change in what the model does.",
        dev_actions.markdown(),
        "## What each iteration trained on",
        "Summed over seeds. `successful_explorations` counts the explorations from a task's "
        "start that completed it (reward 1): what RFT adds to the expert trajectories, so "
        "with few of them RFT is SFT trained further on the same data. Pairs mined per "
        "iteration follow; `pairs_trained_on` counts those the method's loss used (ETO "
        "drops step pairs, as its loss has no step term) and `pairs_dropped` those it left "
        "out as longer than `max_length` even without their oldest turns. The methods of a "
        "seed that explore alike share iteration 1's explorations and pairs: IPR and its "
        "ablations explore from every expert prefix, ETO and RFT each task from its start.",
        training_data.markdown(),
        "## Training steps per iteration",
        "The mixture's per-step diagnostics, averaged over each iteration's optimizer steps "
        "and seeds: the loss and its SFT term and, per DPO level (o: trajectory pairs, s: "
        "step pairs), pair accuracy (share with the chosen side's log-ratio above the "
        "rejected one's) and implicit reward margin (beta times the gap); for the step "
        "level also the chosen and rejected log-ratios. Empty for runs trained before "
        "training steps were recorded.",
        training.markdown(),
        "Every optimizer step, averaged over seeds (dashed: o-DPO, solid: s-DPO; an "
        "iteration's steps spread over [iteration, iteration + 1)):",
        f"![mixture training steps]({training_plot.name})",
        f"```sql\n{training_curve.sql.strip()}\n```",
        "## Cost per iteration",
        "Wall and CPU seconds of the stages (`stage_costs`, summed over seeds), per pair "
        "mined and per point (0.01) of mean dev reward gained over the previous iteration, "
        "and the shares of the time spent on Monte Carlo step rewards, exploration, "
        "training and evaluation. The expert steps' Monte Carlo scoring, stored under "
        "iteration 0, counts in iteration 1. `copied_stages` were copied from another "
        "run with the same inputs (the expert steps' scoring and iteration 1's exploration "
        "from any run, iteration 1's agent steps and pairs from the same seed's): their "
        "cost is the donor's, counted once.",
        costs.markdown(),
        "## Step rewards: expert, agent and margin",
        "Quantiles of the Monte Carlo step rewards of the expert steps and of the agent's "
        "first own actions, and of the margin between them at the same prefix (expert "
        "minus agent), which mining compares with the step margin. "
        "`ipr show pair ID` prints a pair and the samples behind its two rewards.",
        distribution.markdown(),
        "## Step-reward accuracy against gold actions",
        "Where the env gives gold actions: for every step at which the agent's action "
        "differed from the gold action after the same gold history, does the Monte Carlo "
        "step reward rank the gold action higher? Ties count as misses. Gold actions are "
        "one good path, not the only one, so this is a lower bound on agreement. "
        "`pairs_chosen_gold_share` is the share of mined step pairs whose chosen side is "
        "the gold action.",
        accuracy.markdown(),
        "Over the whole experiment, each comparison counted once (the methods of a seed "
        "share iteration 1's step rewards, so the rows above repeat them):",
        overall.markdown(),
        "## Paired comparisons on the test games",
        paired_section(store, experiment_id, episodes.frame, paired, mismatches),
        "### Per-game reward differences",
        "Test reward per game, averaged over the seeds whose episode finished, and the "
        "per-game differences of the comparisons.",
        diffs.markdown(),
        "### Actions on the test games",
        "What the tested models did: their actions by first word, per method over seeds "
        "(failed episodes left out), the share of each method's actions.",
        actions.markdown(),
        "### Test tasks no model told apart",
        "Groups of test tasks on which every tested model wrote the same transcript (actions "
        "and observations). In a store whose splits hold distinct games these are distinct "
        "games that differ where no agent looked (e.g. beyond the first room); in a store "
        "made before splits were deduplicated a group may be one game twice, which the "
        "comparisons above would count twice.",
        same_transcripts.markdown(),
        "### Per-episode outcomes",
        "The source of the paired statistics: per method, seed and test game, the tested "
        "model's outcome; `failed`: the episode failed (left out, never scored 0).",
        f"<details><summary>{len(episodes.frame)} rows</summary>\n\n{episodes.markdown()}"
        "\n\n</details>",
        "## Settled before test",
        settled_section(experiment_id, tests),
        "## What the numbers show",
        analysis(
            settings.frame,
            results.frame,
            per_seed.frame,
            overall.frame,
            training_data.frame,
            paired,
        ),
        "## Run manifests",
        "What shaped each run's numbers besides its config: package versions, the base "
        "model's content id, the task ids of each split (count and hash), the prompt "
        "builder's output for a fixed probe (hash), the machine and the project's commit.",
        manifests,
    ]
    out.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    return [plot, training_plot]


# -- the rule and the settings ---------------------------------------------------------------
def sft_models(settings: pd.DataFrame) -> str:
    """What iteration 0 is: each seed's own SFT model (`sft_per_seed`), or one for all."""
    per_seed = not settings.empty and bool(settings["sft_per_seed"].iloc[0])
    return "each seed's own SFT model" if per_seed else "the SFT model every seed shares"


def iteration_rule(settings: pd.DataFrame) -> str:
    """The iteration-0 rule of the experiment (`fallback_to_sft`), one for every method."""
    fallback = bool(settings["fallback_to_sft"].iloc[0]) if not settings.empty else False
    if fallback:
        return (
            "Iteration-0 rule (`fallback_to_sft: true`, the same for every method): a trained "
            "method may pick iteration 0, its SFT model, when dev says so."
        )
    return (
        "Iteration-0 rule (`fallback_to_sft: false`, the same for every method): a trained "
        "method picks among its trained iterations (>= 1), even where dev prefers the SFT "
        "model."
    )


# -- paired comparisons over test games -----------------------------------------------------


def episode_mismatches(episodes: pd.DataFrame, results: pd.DataFrame) -> list[str]:
    """Methods whose test episodes are not seeds x test tasks: the dev/test separation of
    the episodes query failed (e.g. no dev-only evaluation to learn the dev tasks from)."""
    found_by_method = episodes.groupby("method").size()
    problems = []
    for row in results.itertuples():
        expected = int(row.seeds) * int(row.test_tasks)
        found = int(found_by_method.get(row.method, 0))
        if found != expected:
            problems.append(f"{row.method}: {found} test episodes, expected {expected}")
    return problems


def paired_section(
    store: Store,
    experiment_id: str,
    episodes: pd.DataFrame,
    paired: pd.DataFrame,
    mismatches: Sequence[str],
) -> str:
    """The paired-comparison table with how it was computed and how to recompute it."""
    tasks = len(episodes)
    failed = int(episodes["failed"].astype(int).sum()) if tasks else 0
    n_games = episodes["game_id"].nunique() if tasks else 0
    per_run = episodes.groupby(["method", "seed"]).size().max() if tasks else 0
    code = f"{paired_comparisons.__module__}.{paired_comparisons.__qualname__}"
    text = [
        f"Each run is tested on {per_run} test tasks ({n_games} across runs), each a "
        "distinct game: splits hold each game once, by what the engine generates for it "
        "(for stores made before that, see the transcript check below). Methods are "
        "compared game by game and, within a game, seed by seed (the methods of a seed share "
        "its SFT model and data). A - B is the mean over games of the game's mean over seeds "
        "of A - B. Its 95% interval is a hierarchical percentile bootstrap (games resampled "
        "with replacement, then seeds within each drawn game); `p` is a two-sided paired "
        "sign-flip permutation test over games (exact over every sign vector up to "
        f"{MAX_EXACT_GAMES} games, else {N_PERMUTATIONS} random ones). `verdict` applies the "
        f"two-test rule: A is better only when the interval excludes 0 AND p < {ALPHA} "
        "(else `not shown`). `a_higher`, `a_lower` and `equal` count games. Reward and "
        "success: higher is better; steps: fewer is better (the paper's action-efficiency "
        "claim).",
        f"Failed episodes (status {', '.join(sorted(FAILED_STATUSES))}) are excluded, never "
        f"scored 0: {failed} of {tasks} test episodes failed. A game with no seed on which "
        "both methods finished drops out of that comparison (`games`).",
        "Rollouts carry no split, and a model's dev and test episodes share its run and "
        "iteration, so the per-game queries leave out the dev tasks, found as those of dev "
        "evaluations with no test evaluation of the same model beside them (a trained "
        "run's iteration 0); the episodes found are checked against seeds x test tasks.",
    ]
    if mismatches:
        text.append(
            "Not computed: the test episodes do not match the evaluations ("
            + "; ".join(mismatches)
            + "), so the test tasks could not be told apart from the dev tasks."
        )
        return "\n\n".join(text)
    text.append(
        f"Computed in Python by `{code}` (bootstrap: {N_RESAMPLES} resamples, "
        f"`numpy.random.default_rng({BOOTSTRAP_SEED})`, 2.5/97.5 percentiles; permutations: "
        f"`numpy.random.default_rng({PERMUTATION_SEED})`) from the output of the episodes "
        "query under *Per-episode outcomes*; this regenerates it:"
    )
    text.append(markdown_table(paired))
    text.append(
        "```python\n"
        f"from {__name__} import COMPARED, EPISODES_SQL, run_query\n"
        f"from {paired_comparisons.__module__} import paired_comparisons\n"
        "from ipr_core.store.store import Store\n\n"
        f"store_path = {_literal(str(store.path))}\n"
        f"experiment_id = {_literal(experiment_id)}\n"
        "episodes = run_query(Store(store_path), EPISODES_SQL, experiment_id)\n"
        "print(paired_comparisons(episodes.frame, COMPARED))\n```"
    )
    return "\n\n".join(text)


def _literal(text: str) -> str:
    """A double-quoted string literal: the printed code is as ruff formats it, and a literal
    assigned alone stays on its line however long the path is."""
    return json.dumps(text)


# -- how much of the experiment the report covers ------------------------------------------
def coverage(experiment_id: str, finished: pd.DataFrame) -> str:
    """Which of the runs the experiment's committed config plans are finished (`finished`:
    the per-seed table), so a report made while the experiment runs says so before any
    number."""
    path = experiment_config_file(experiment_id)
    if path is None:
        return (
            f"No config under `configs/` has `experiment_id: {experiment_id}`: the runs "
            "it plans are unknown."
        )
    try:
        config = load_experiment_config(path)
    except InputError as error:
        return f"The experiment's config does not load ({error}): the runs it plans are unknown."
    return coverage_statement(str(path.relative_to(REPO)), config, finished)


def coverage_statement(shown: str, config: ExperimentConfig, finished: pd.DataFrame) -> str:
    planned = [(m, s) for s in config.seeds for m in config.methods]
    done = set(zip(finished["method"], finished["seed"].astype(int), strict=True))
    missing = [f"{m} seed {s}" for m, s in planned if (m, s) not in done]
    if not missing:
        return f"Every run `{shown}` plans ({len(planned)}: methods x seeds) is finished."
    return (
        f"**In progress: {len(planned) - len(missing)} of the {len(planned)} runs `{shown}` "
        f"plans are finished** (not yet: {', '.join(missing)}). Every table and statement "
        "below covers the finished runs only: none of it is the experiment's result."
    )


# -- settled before test ----------------------------------------------------------------------


@dataclass(frozen=True)
class Commit:
    sha: str
    when: datetime
    subject: str


REPO = Path(__file__).resolve().parents[1]
"""The project checkout whose `configs/` and git history the report reads."""


def experiment_config_file(experiment_id: str, root: Path = REPO) -> Path | None:
    """The committed config under `configs/` whose experiment_id is `experiment_id`."""
    for path in sorted((root / "configs").glob("*.yaml")):
        try:
            if read_yaml_mapping(path).get("experiment_id") == experiment_id:
                return path
        except InputError:
            continue
    return None


def config_commits(path: Path, root: Path = REPO) -> list[Commit] | None:
    """The commits that changed `path`, newest first (None: no git history to read)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "log", "--format=%H%x09%cI%x09%s", "--", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    commits = []
    for line in out.splitlines():
        sha, when, subject = line.split("\t", 2)
        commits.append(Commit(sha, datetime.fromisoformat(when).astimezone(UTC), subject))
    return commits


def settled_section(experiment_id: str, tests: Table) -> str:
    """The config's commit before the first test evaluation and each test evaluation's
    time, flagging any test evaluation older than the config's last change."""
    text = [
        "Tuning never evaluates a test task (a config with `tuning: true` stops at dev). "
        "The experiment's settings must be committed before its first test evaluation: "
        "each test evaluation below (time in UTC, as the store wrote it; `code_commit` is "
        "the project commit the run's manifest recorded) is compared with the commits of "
        "the experiment's config file."
    ]
    path = experiment_config_file(experiment_id)
    times = [
        datetime.strptime(t, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
        for t in tests.frame["tested_at"]
    ]
    if path is None:
        text.append(f"No config under `configs/` has `experiment_id: {experiment_id}`.")
    else:
        shown = str(path.relative_to(REPO))
        text += settled_statements(shown, config_commits(path), times)
    text.append(tests.markdown())
    return "\n\n".join(text)


def settled_statements(
    config: str, commits: Sequence[Commit] | None, tested: Sequence[datetime]
) -> list[str]:
    """What the config's commits (newest first) say of the test evaluations' times."""
    if not commits:
        return [f"`{config}` has no commit in git (or git is absent)."]
    last = commits[0]
    if not tested:
        return [f"No test evaluation yet; `{config}` was last changed in {last.sha[:12]} "
                f"({_when(last.when)})."]  # fmt: skip
    first = min(tested)
    before = [c for c in commits if c.when <= first]
    if before:
        lines = [
            f"Config `{config}`: the commit that last changed it before the first test "
            f"evaluation ({_when(first)}) is {before[0].sha[:12]} ({_when(before[0].when)}, "
            f'"{before[0].subject}").'
        ]
    else:
        lines = [
            f"**Flag:** config `{config}` had no commit before the first test evaluation "
            f"({_when(first)}): its first commit is {commits[-1].sha[:12]} "
            f"({_when(commits[-1].when)})."
        ]
    older = sum(t < last.when for t in tested)
    if older:
        lines.append(
            f"**Flag:** {older} of {len(tested)} test evaluations are older than the config's "
            f'last change, {last.sha[:12]} ({_when(last.when)}, "{last.subject}"): the '
            "settings that produced them are not the committed ones."
        )
    else:
        lines.append(
            f"Every test evaluation is newer than the config's last change "
            f"({last.sha[:12]}, {_when(last.when)})."
        )
    return lines


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


# -- analysis ------------------------------------------------------------------------------
def analysis(
    settings: pd.DataFrame,
    results: pd.DataFrame,
    per_seed: pd.DataFrame,
    accuracy: pd.DataFrame,
    training_data: pd.DataFrame,
    paired: pd.DataFrame | None = None,
) -> str:
    """Statements computed from the tables above: who beats whom, by how much, how often."""
    if results.empty:
        return "No finished run yet: nothing to compare."
    lines = paired_statements(paired) if paired is not None else []
    shared = shared_seeds(per_seed)
    means = {method: float(shared[method].mean()) for method in shared}
    scope = ""
    if len(shared) < per_seed["seed"].nunique():
        seeds = ", ".join(str(seed) for seed in shared.index)
        scope = f" over seed(s) {seeds or 'none'} (those every method finished)"
    ranking = sorted(means, key=lambda m: -means[m])
    lines.append(
        f"- Ranking by mean test reward{scope}: "
        + (", ".join(f"{m} {_fmt(means[m])}" for m in ranking) or "none")
        + "."
    )
    lines.append(success_statement(results))
    rft = rft_statement(training_data, settings)
    if rft:
        lines.append(rft)
    for better, worse in ((IPR.name, ETO.name), (ETO.name, SFT.name), (IPR.name, SFT.name)):
        lines.append("- " + compare(better, worse, per_seed))
    paper = (IPR.name, ETO.name, SFT.name)
    if all(m in means for m in paper):
        holds = means[IPR.name] > means[ETO.name] > means[SFT.name]
        lines.append(
            f"- The paper's ordering IPR > ETO > SFT on mean test reward{scope} holds here: "
            + ("yes" if holds else "no")
            + _ordering_evidence(paired)
            + "."
        )
    if SFT.name in set(results["method"]):
        sft_row = results[results["method"] == SFT.name].iloc[0]
        expert = _num(settings["expert_reward"].iloc[0]) if not settings.empty else None
        spread = _num(getattr(sft_row, "reward_std", None))
        same = spread == 0.0 and int(sft_row.seeds) > 1  # one seed says nothing of seeds
        lines.append(
            f"- The SFT agent's test reward is {_fmt(_num(sft_row.reward_mean))} (success "
            f"{_fmt(_num(sft_row.success_mean))}); the expert trajectories it learned from "
            f"reach {_fmt(expert)}."
            + (
                " The SFT row is the same on every seed (one SFT model, evaluated greedily), "
                "so its seeds are not independent samples of SFT training."
                if same
                else ""
            )
        )
    n_tasks = _num(results["test_tasks"].max())
    if n_tasks:
        lines.append(
            f"- Resolution: {int(n_tasks)} test tasks per run, so one task more or less "
            f"solved moves a run's success rate by {_fmt(1 / n_tasks)}; with "
            f"{int(results['seeds'].max())} seed(s), differences smaller than the seed spread "
            "are not evidence."
        )
    compared = int(accuracy["compared_steps"].iloc[0]) if not accuracy.empty else 0
    if compared:
        row = accuracy.iloc[0]
        lines.append(
            f"- Step rewards: of {compared} steps where the agent left the gold path, the "
            f"Monte Carlo estimate ranked the gold action higher in {int(row.gold_higher)} "
            f"({_fmt(_num(row.step_reward_accuracy))}), tied in {int(row.tied)} and ranked "
            f"it lower in {int(row.gold_lower)}."
        )
    else:
        lines.append("- Step rewards: no step was compared against a gold action.")
    return "\n".join(lines)


def success_statement(results: pd.DataFrame) -> str:
    """Games completed per method; where no method completes one, a reward difference is one
    of the env's partial credit (e.g. points for picking items up), and the report says so."""
    success = {row.method: _num(row.success_mean) for row in results.itertuples()}
    shown = ", ".join(f"{m} {_fmt(v)}" for m, v in success.items())
    line = f"- Success rate (share of test games completed, mean over seeds): {shown}."
    known = [v for v in success.values() if v is not None]
    if known and all(v == 0 for v in known):
        line += (
            " No method completes a single test game: every reward difference here is one of "
            "the game's partial credit, not of games solved (the actions table shows how each "
            "model earned it)."
        )
    return line


def rft_statement(training_data: pd.DataFrame, settings: pd.DataFrame) -> str | None:
    """What RFT had of its own to learn from: its successful explorations beside the expert
    trajectories every iteration trains on again. With few, RFT is SFT trained further, and
    IPR - RFT compares IPR with that, not with learning from the agent's own successes."""
    rows = training_data[training_data["method"] == RFT.name]
    if rows.empty:
        return None
    successes = int(rows["successful_explorations"].sum())
    line = (
        f"- RFT's own successes: {successes} of its explorations completed their task, over "
        f"{len(rows)} iteration(s) and {int(rows['seeds'].max())} seed(s)"
    )
    experts = _num(settings["sft_tasks"].iloc[0]) if not settings.empty else None
    if experts is None:  # every training task: the count is not in the config
        return line + ", beside the expert trajectories each iteration trains on again."
    share = successes / (successes + int(experts) * int(rows["seeds"].sum()))
    line += (
        f", beside the {int(experts)} expert trajectories each iteration trains on again "
        f"({share:.1%} of what it trained on)."
    )
    if share < RFT_FEW_SUCCESSES:
        line += (
            " With so few, RFT here is mostly SFT trained further on the same data, and "
            "IPR - RFT compares IPR with that."
        )
    return line


def _ordering_evidence(paired: pd.DataFrame | None) -> str:
    """Which steps of IPR > ETO > SFT the two-test rule shows (means alone can be noise)."""
    if paired is None or paired.empty:
        return ""
    rows = {(r.comparison, r.metric): r for r in paired.itertuples()}
    steps = [rows.get((f"{a.name} - {b.name}", "reward")) for a, b in ((IPR, ETO), (ETO, SFT))]
    if any(row is None for row in steps):
        return ""
    weak = [row.comparison.upper() for row in steps if row.verdict != "A better"]
    if not weak:
        return " (both steps shown under the two-test rule)"
    return f" on the means, but the two-test rule does not show {' nor '.join(weak)} above 0"


def paired_statements(paired: pd.DataFrame) -> list[str]:
    """The comparisons as claims under the two-test rule, then which of them IPR wins."""
    if paired.empty:
        return ["- Paired comparisons on test games: none computed."]
    rows = {(r.comparison, r.metric): r for r in paired.itertuples()}
    lines, wins, not_shown = [], [], []
    for a, b in COMPARED:
        row = rows.get((f"{a} - {b}", "reward"))
        if row is None:
            continue
        big_a, big_b = a.upper(), b.upper()
        claim = {
            "A better": f"{big_a} beats {big_b}",
            "B better": f"{big_b} beats {big_a}",
            "not shown": f"{big_a} does not beat {big_b}",
        }[row.verdict]
        lines.append(f"- {claim}: {_interval(row, big_a, big_b, 'test reward')}.")
        if a == IPR.name:
            (wins if row.verdict == "A better" else not_shown).append(big_b)
    for a, b in COMPARED[:2]:
        row = rows.get((f"{a} - {b}", "steps"))
        if row is not None:
            reading = {
                "A better": f"{a.upper()} needs fewer steps",
                "B better": f"{a.upper()} takes more steps",
                "not shown": "no difference in steps shown",
            }[row.verdict]
            lines.append(
                f"- Action efficiency: {_interval(row, a.upper(), b.upper(), 'average steps')}"
                f" ({reading})."
            )
    if wins or not_shown:
        lines.append(
            "- Under the two-test rule (interval above 0 and p < 0.05) IPR wins against: "
            + (", ".join(wins) if wins else "none")
            + "; not shown against: "
            + (", ".join(not_shown) if not_shown else "none")
            + "."
        )
    for ablated in (m for m in REGISTRY.values() if m.ablates):
        row = rows.get((f"{IPR.name} - {ablated.name}", "reward"))
        if row is not None:
            reading = {
                "A better": f"removing {ablated.ablates} costs reward, as in the paper",
                "not shown": f"no evidence here that {ablated.ablates} matters",
                "B better": f"better without {ablated.ablates}, against the paper",
            }[row.verdict]
            lines.append(f"- Without {ablated.ablates} ({ablated.name}): {reading}.")
    return lines


def _interval(row: Any, a: str, b: str, what: str) -> str:
    """'IPR 0.450 vs SFT 0.400, IPR - SFT test reward = +0.050, 95% CI [0.010, 0.090],
    p = 0.012 over 50 games (...)'."""
    return (
        f"{a} {row.a_mean:.3f} vs {b} {row.b_mean:.3f}, {a} - {b} {what} = "
        f"{_signed(row.mean_diff)}, 95% CI [{row.ci_low:.3f}, {row.ci_high:.3f}] "
        f"({row.ci}), {_p(row.p)} over {row.games} games ({a} higher on {row.a_higher}, "
        f"lower on {row.a_lower}, equal on {row.equal})"
    )


def seed_rewards(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Test reward by seed (rows) and method (columns); NaN where a seed's run is missing."""
    return per_seed.pivot_table(index="seed", columns="method", values="test_reward")


def shared_seeds(per_seed: pd.DataFrame) -> pd.DataFrame:
    """`seed_rewards` on the seeds every method finished. While an experiment runs, methods
    have finished different seeds, and each seed has its own SFT model: means over different
    seeds do not compare."""
    return seed_rewards(per_seed).dropna()


def compare(better: str, worse: str, per_seed: pd.DataFrame) -> str:
    """Is `better`'s mean test reward above `worse`'s on the seeds both finished, answered
    with the margin, the seed ranges and the per-seed wins (seeds pair the runs: same SFT
    model, same iteration-1 data); "beats" is kept for the two-test rule's verdicts."""
    title = f"{better.upper()} vs {worse.upper()}: not compared"
    missing = [m for m in (better, worse) if m not in set(per_seed["method"])]
    if missing:
        return f"{title} ({', '.join(missing)} not run)."
    seeds = seed_rewards(per_seed)
    if better not in seeds or worse not in seeds:
        return f"{title} (no test reward)."
    both = seeds[[better, worse]].dropna()
    if both.empty:
        return f"{title} (no seed on which both finished)."
    mean_b, mean_w = float(both[better].mean()), float(both[worse].mean())
    delta = mean_b - mean_w
    verdict = "yes" if delta > 0 else "no (equal)" if delta == 0 else "no"
    wins = int((both[better] > both[worse]).sum())
    ties = int((both[better] == both[worse]).sum())
    overlap = both[better].min() <= both[worse].max() and both[worse].min() <= both[better].max()
    spread = (
        "one seed: no seed range to compare."
        if len(both) < 2
        else "the seed ranges " + ("overlap." if overlap else "do not overlap.")
    )
    partial = len(both) < len(seeds[[better, worse]].dropna(how="all"))
    return (
        f"Is {better.upper()}'s mean test reward above {worse.upper()}'s? {verdict}: "
        f"{_fmt(mean_b)} vs {_fmt(mean_w)} ({_signed(delta)})"
        + (" (means over the seeds both finished)" if partial else "")
        + f"; higher on {wins} of {len(both)} seeds ({ties} tied); {spread}"
    )


def _num(value: object) -> float | None:
    if value is None or value is pd.NA:
        return None
    number = float(value)
    return None if math.isnan(number) else number


def _fmt(value: float | None) -> str:
    return "NULL" if value is None else f"{value:.3f}"


def _p(value: float) -> str:
    return f"p = {value:.4f}" if value >= 1e-4 else "p < 0.0001"


def _signed(value: float) -> str:
    return f"{value:+.3f}"
