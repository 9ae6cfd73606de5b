"""The WebShop adapter's parsing and protocol, against a FIXTURE shop (tests/webshop_fixture.py).

WebShop's product data cannot be obtained here, so these tests drive a tiny loopback app that
serves hand-written WebShop-shaped pages; its scores are the fixture's, not WebShop's.
"""

from __future__ import annotations

import sys
import types
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from webshop_fixture import GOALS, serve_fixture_shop

from ipr_core.envs import EnvCrashed, known_env_ids, make_env
from ipr_core.envs import webshop as ws
from ipr_core.envs.webshop import HttpShop, WebShopEnv, parse_page
from ipr_core.errors import InputError

GOLD = [
    "search[red cotton t-shirt]",
    "click[B0FIXRED01]",
    "click[red]",
    "click[m]",
    "click[Buy Now]",
]


@pytest.fixture(scope="module")
def shop_url() -> Iterator[str]:
    with serve_fixture_shop() as (url, _):
        yield url


@pytest.fixture
def env(shop_url: str) -> Iterator[WebShopEnv]:
    made = WebShopEnv(HttpShop(shop_url, num_goals=len(GOALS)))
    yield made
    made.close()


def test_observations_are_webshops_simple_text_mode(env: WebShopEnv) -> None:
    task = env.reset("test-0")
    assert task.instruction == GOALS[0]["instruction"]
    # As in ETO's and IPR's WebShop trajectories: visible text only, [SEP]-separated.
    assert task.initial_observation == (
        f"WebShop [SEP] Instruction: [SEP] {GOALS[0]['instruction']} [SEP] Search"
    )
    results = env.step("search[coffee t-shirt]").observation
    assert "Back to Search [SEP] Next > [SEP] B0FIXRED01 [SEP] Red Cotton T-Shirt" in results
    assert "var x" not in results and "fixture page" not in results and "margin" not in results


def test_parse_page_reads_clickables_search_box_and_score(shop_url: str) -> None:
    html = urllib.request.urlopen(f"{shop_url}/search_results/fixed_0/coffee%20t-shirt/1").read()
    page = parse_page(html.decode())
    assert set(page.clickables) == {"back to search", "next >", "b0fixred01", "b0fixblu02"}
    assert page.search is None and page.reward is None
    assert page.clickables["next >"].method == "POST"
    start = parse_page(urllib.request.urlopen(f"{shop_url}/fixed_1").read().decode())
    assert start.search is not None and start.search[1] == "search_query"
    assert "search" not in start.clickables  # WebShop never lets the agent click[search]
    done = parse_page(
        '<h3 id="reward">Your score (min 0.0, max 1.0)<pre>0.75</pre></h3><pre>9</pre>'
    )
    assert done.reward == 0.75


def test_scripted_gold_path_reaches_the_fixtures_full_score(env: WebShopEnv) -> None:
    env.reset("test-0")
    results = [env.step(action) for action in GOLD]
    assert [r.done for r in results] == [False] * 4 + [True]
    assert [r.reward for r in results] == [0.0] * 4 + [1.0]
    assert env.step("click[Back to Search]") == results[-1]


def test_the_reward_is_the_shops_score(env: WebShopEnv) -> None:
    env.reset("test-0")
    for action in ["search[red cotton t-shirt]", "click[b0fixred01]", "click[RED]"]:
        env.step(action)
    assert env.step("click[buy now]").reward == 0.75  # size not chosen: the fixture's 0.75
    env.reset("test-0")
    for action in ["search[coffee t-shirt]", "click[Next >]", "click[B0FIXMUG03]"]:
        env.step(action)
    assert env.step("click[Buy Now]").reward == 0.0


@pytest.mark.parametrize(
    "action",
    [
        "",
        "buy the shirt",
        "click[]",
        "search[]",
        "click[Buy Now",
        "click[B0NOTHERE]",
        "click[search]",
        "Click[Back to Search]",
        "x" * 100_000,
        "search[a]\nclick[b]",
        "click[\u2603 'quoted' \\]",
    ],
)
def test_invalid_actions_get_an_observation(env: WebShopEnv, action: str) -> None:
    env.reset("test-1")
    result = env.step(action)
    assert result.observation.startswith("Invalid action:")
    assert not result.done and result.reward == 0.0


def test_search_needs_a_search_box(env: WebShopEnv) -> None:
    env.reset("test-1")
    env.step("search[mug]")
    result = env.step("search[mug]")
    assert "no search box" in result.observation
    assert env.step("click[Back to Search]").observation.endswith("[SEP] Search")


def test_episode_ends_at_max_steps_with_reward_zero(env: WebShopEnv) -> None:
    env.reset("test-1")
    actions = ["search[mug]", "click[Back to Search]"] * 5
    results = [env.step(a) for a in actions]
    assert env.max_steps == 10
    assert [r.done for r in results] == [False] * 9 + [True]
    assert results[-1].reward == 0.0


def test_splits_follow_webshops_goal_ranges(shop_url: str) -> None:
    env = WebShopEnv(HttpShop(shop_url, num_goals=2000))
    assert env.task_ids("test") == [f"test-{i}" for i in range(500)]
    assert env.task_ids("dev")[0] == "dev-500" and len(env.task_ids("dev")) == 1000
    assert env.task_ids("train") == [f"train-{i}" for i in range(1500, 2000)]
    with pytest.raises(ValueError, match="validation"):
        env.task_ids("validation")
    for bad in ["test-500", "train-0", "dev-x", "7"]:
        with pytest.raises(ValueError, match=bad):
            env.reset(bad)
    assert env.gold_actions() is None


def test_a_dead_server_is_an_env_crash(shop_url: str) -> None:
    with serve_fixture_shop() as (url, server):
        env = WebShopEnv(HttpShop(url, num_goals=2))
        env.reset("test-0")
        server.shutdown()
        server.server_close()
        with pytest.raises(EnvCrashed, match="failed"):
            env.step("search[mug]")
        with pytest.raises(EnvCrashed):
            env.reset("test-0")
    env = WebShopEnv(HttpShop(shop_url, num_goals=5))
    with pytest.raises(EnvCrashed, match="500"):  # the app has no goal 4
        env.reset("test-4")


def test_registry_makes_webshop_from_webshop_url(
    shop_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "webshop" in known_env_ids()
    monkeypatch.setenv("WEBSHOP_URL", shop_url)
    monkeypatch.setenv("WEBSHOP_NUM_GOALS", "2")
    env = make_env("webshop")
    assert env.task_ids("test") == ["test-0", "test-1"]
    assert env.reset("test-1").instruction == GOALS[1]["instruction"]
    monkeypatch.setenv("WEBSHOP_NUM_GOALS", "two")
    with pytest.raises(InputError, match="WEBSHOP_NUM_GOALS"):
        make_env("webshop")


def test_without_a_webshop_the_error_says_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WEBSHOP_URL", raising=False)
    monkeypatch.setitem(sys.modules, "web_agent_site", None)  # not importable
    with pytest.raises(InputError, match="WEBSHOP_URL"):
        make_env("webshop")


class FixtureTextEnv:
    """FIXTURE standing in for web_agent_site's WebAgentTextEnv (its constructor, reset,
    step and state), browsing the fixture shop; built with `server` it shares that one."""

    shop_url = ""
    made_servers: list[Any] = []

    def __init__(self, observation_mode: str, server: Any = None, **kwargs: Any):
        assert observation_mode == "text"
        if server is None:
            server = types.SimpleNamespace(goals=GOALS, url=self.shop_url)
            FixtureTextEnv.made_servers.append(server)
        self.server, self.prefix = server, kwargs["session_prefix"]
        self.html = ""

    def reset(self, session: int) -> tuple[str, None]:
        self.session = f"{self.prefix}fixed_{session}"
        self._get(f"{self.server.url}/{self.session}")
        return self.html, None

    def step(self, action: str) -> tuple[str, float, bool, None]:
        page = parse_page(self.html)
        kind, arg = action[:-1].split("[", 1)
        if kind == "search":
            data = urllib.parse.urlencode({"search_query": arg}).encode()
            self._get(f"{self.server.url}/{self.session}", data)
        elif arg == "crash":
            raise KeyError("the fixture's stand-in for a WebShop failure")
        else:
            target = page.clickables[arg.lower()]
            self._get(
                urllib.parse.urljoin(self.url, target.url), b"" if target.method == "POST" else None
            )
        reward = parse_page(self.html).reward
        return self.html, reward or 0.0, reward is not None, None

    @property
    def state(self) -> dict[str, str]:
        return {"html": self.html}

    def _get(self, url: str, data: bytes | None = None) -> None:
        with urllib.request.urlopen(url, data=data) as response:
            self.html, self.url = response.read().decode(), response.geturl()


def test_in_process_mode_shares_one_product_server(
    shop_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(FixtureTextEnv, "shop_url", shop_url)
    monkeypatch.setattr(FixtureTextEnv, "made_servers", [])
    module = types.ModuleType("web_agent_site.envs.web_agent_text_env")
    module.WebAgentTextEnv = FixtureTextEnv  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "web_agent_site", types.ModuleType("web_agent_site"))
    monkeypatch.setitem(sys.modules, "web_agent_site.envs", types.ModuleType("envs"))
    monkeypatch.setitem(sys.modules, "web_agent_site.envs.web_agent_text_env", module)
    monkeypatch.delenv("WEBSHOP_URL", raising=False)
    monkeypatch.setattr(ws, "_SHARED_SERVER", [])
    first, second = make_env("webshop"), make_env("webshop")
    assert len(FixtureTextEnv.made_servers) == 1
    assert first._shop._env.prefix != second._shop._env.prefix  # type: ignore[attr-defined]
    assert first.task_ids("test") == ["test-0", "test-1"]
    first.reset("test-0")
    second.reset("test-0")
    second.step("search[mug]")
    results = [first.step(a) for a in GOLD]
    assert results[-1].done and results[-1].reward == 1.0
    second.reset("test-0")
    second.step("search[coffee t-shirt]")
    with pytest.raises(EnvCrashed, match="KeyError"):
        second._shop.click(second._page, "crash")  # type: ignore[attr-defined]
