"""WebShop adapter (env id `webshop`) for a user's own WebShop installation.

WebShop (Yao et al. 2022) needs its product data (items_shuffle.json, items_ins_v2.json,
items_human_ins.json) and a Lucene search index built from it, which cannot be obtained on
this project's machines; data/README.md says what to download and how. Two ways to reach it:

- over HTTP (`WEBSHOP_URL`, e.g. http://127.0.0.1:3000): WebShop's own flask app
  (`python -m web_agent_site.app`). Session `fixed_<i>` is goal i; search posts the search
  form, a click follows the button's form, the product link or the option's data-url, and
  the reward is the score the app prints on the page that 'Buy Now' leads to.
- in process, when `web_agent_site` is importable and `WEBSHOP_URL` is unset: its
  `WebAgentTextEnv` (text mode), one product server shared by the process's instances, each
  instance with its own session names so parallel episodes of one goal do not share state.
  `WEBSHOP_NUM_PRODUCTS` sets its `num_products` (1000 for the small data set; unset: all).

Both read the page HTML, so the agent sees the same text either way: WebShop's "simple"
text mode (the visible text nodes, stripped, joined by " [SEP] "; empty nodes dropped, as in
ETO's and IPR's trajectories). Actions follow the paper's grammar, `search[keywords]` (only
where the page has a search box) and `click[value]` (a button, product or option of the
page, case-insensitive); anything else is answered with an observation and costs a step.
The reward is WebShop's own (attribute, option, price and type match) when 'Buy Now' ends
the episode, 0 when the 10 steps (the paper's limit) run out first.

Task ids follow WebShop's split of its goals after their seed-233 shuffle: test = goals
0-499, dev = 500-1499, train = 1500 onwards (`WEBSHOP_NUM_GOALS` goals over HTTP, 12087 by
default, the human-instruction count; in process, the server's own count). WebShop has no
gold action sequences: expert trajectories come from ETO/IPR SFT files (`ipr ingest --source`).
"""

from __future__ import annotations

import itertools
import os
import re
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any, Protocol

from ipr_core.envs.base import EnvCrashed, EnvTask, StepResult
from ipr_core.errors import InputError

ENV_ID = "webshop"
MAX_STEPS = 10
SPLITS = {"train": (1500, None), "dev": (500, 1500), "test": (0, 500)}
"""Goal index ranges (end None: to the last goal), WebShop's own split."""
DEFAULT_NUM_GOALS = 12087
HTTP_TIMEOUT_S = 60.0
MAX_ACTION_CHARS = 500
ACTION_HINT = (
    "You are shopping on a web site. An action is either search[keywords], on a page with a "
    "search box, or click[value], where value is a button, product id or option shown in "
    "the observation (e.g. click[Buy Now], click[< Prev], click[Next >]); page elements "
    "are separated by [SEP]. Choose the product and options that match the instruction, "
    "then click[Buy Now]."
)

_ACTION = re.compile(r"(search|click)\[([^\[\]]*)\]")
_INVISIBLE_PARENTS = frozenset({"style", "script", "head", "title", "meta"})
_VOID_TAGS = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}
)


@dataclass(frozen=True)
class Target:
    """Where a clickable leads: an HTTP method and URL (relative to the page)."""

    method: str
    url: str


@dataclass
class Page:
    """What the adapter needs from one WebShop page."""

    text: str
    instruction: str
    clickables: dict[str, Target]
    """Lower-cased button, product-link and option texts."""
    search: tuple[Target, str] | None
    """The search form's target and its text field's name, where the page has one."""
    reward: float | None
    """The score on the page 'Buy Now' leads to."""


@dataclass
class _Element:
    tag: str
    attrs: dict[str, str]
    text: list[str] = field(default_factory=list)


class _PageParser(HTMLParser):
    """Visible text, clickables, search form, instruction and score of a WebShop page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[_Element] = []
        self.texts: list[str] = []
        self.form: Target | None = None
        self.clickables: dict[str, Target] = {}
        self.search: tuple[Target, str] | None = None
        self.instruction: str | None = None
        self.reward_text: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.form = Target(a.get("method", "get").upper(), a.get("action", ""))
        elif tag == "input" and a.get("id") == "search_input" and self.form is not None:
            self.search = (self.form, a.get("name", "search_query"))
        elif tag == "input" and a.get("type") == "radio" and "value" in a:
            self.clickables[a["value"].lower()] = Target("GET", a.get("data-url", ""))
        if tag not in _VOID_TAGS:
            self.stack.append(_Element(tag, a))

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self.form = None
        depth = next(
            (i for i in range(len(self.stack) - 1, -1, -1) if self.stack[i].tag == tag), None
        )
        if depth is None:
            return  # a stray end tag (WebShop's results page closes <h4> with </h5>)
        for element in reversed(self.stack[depth:]):
            self._finish(element)
        del self.stack[depth:]

    def handle_data(self, data: str) -> None:
        parent = self.stack[-1].tag if self.stack else "[document]"
        if parent in _INVISIBLE_PARENTS:
            return
        self.texts.append(data)
        for element in self.stack:
            element.text.append(data)

    def _finish(self, element: _Element) -> None:
        text = "".join(element.text).strip()
        classes = element.attrs.get("class", "").split()
        if "btn" in classes and text:
            # WebShop's buttons each sit in a form that posts to the page they lead to.
            self.clickables[text.lower()] = self.form or Target("GET", "")
        elif "product-link" in classes and text:
            self.clickables[text.lower()] = Target("GET", element.attrs.get("href", ""))
        elif element.tag == "h4" and self.instruction is None and self._inside("instruction-text"):
            self.instruction = text
        elif element.tag == "pre" and self._inside("reward"):
            self.reward_text = text

    def _inside(self, element_id: str) -> bool:
        return any(e.attrs.get("id") == element_id for e in self.stack)


def parse_page(html: str) -> Page:
    """Read a WebShop page; `text` is WebShop's simple text mode without empty nodes."""
    parser = _PageParser()
    parser.feed(html)
    parser.close()
    for element in reversed(parser.stack):  # elements left open at the end of the document
        parser._finish(element)
    instruction = re.sub(r"^Instruction:\s*", "", parser.instruction or "").strip()
    reward = None
    if parser.reward_text is not None:
        try:
            reward = float(parser.reward_text)
        except ValueError:
            raise EnvCrashed(f"webshop: unreadable score {parser.reward_text!r}") from None
    return Page(
        text=" [SEP] ".join(t.strip() for t in parser.texts if t.strip()),
        instruction=instruction,
        clickables={k: v for k, v in parser.clickables.items() if k != "search"},
        search=parser.search,
        reward=reward,
    )


class Shop(Protocol):
    """A way to reach WebShop: its HTTP app or its in-process text env."""

    num_goals: int

    def open(self, goal: int) -> Page: ...

    def search(self, page: Page, keywords: str) -> Page: ...

    def click(self, page: Page, value: str) -> Page: ...

    def close(self) -> None: ...


class HttpShop:
    """WebShop's flask app at `base_url`, driven through its HTML forms and links."""

    def __init__(self, base_url: str, num_goals: int = DEFAULT_NUM_GOALS):
        self.base_url = base_url.rstrip("/") + "/"
        self.num_goals = num_goals
        self._url = self.base_url

    def open(self, goal: int) -> Page:
        self._url = self.base_url
        return self._fetch(Target("GET", f"fixed_{goal}"))

    def search(self, page: Page, keywords: str) -> Page:
        assert page.search is not None
        target, field_name = page.search
        return self._fetch(Target("POST", target.url), {field_name: keywords})

    def click(self, page: Page, value: str) -> Page:
        return self._fetch(page.clickables[value.lower()])

    def close(self) -> None:
        """Nothing to release: every request is its own connection."""

    def _fetch(self, target: Target, form: dict[str, str] | None = None) -> Page:
        url = urllib.parse.urljoin(self._url, target.url)
        data = urllib.parse.urlencode(form or {}).encode() if target.method == "POST" else None
        request = urllib.request.Request(url, data=data, method=target.method)
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
                html = response.read().decode("utf-8", errors="replace")
                self._url = response.geturl()  # after redirects, for relative links
        except OSError as e:  # refused, reset, timed out, HTTP errors (URLError is one)
            raise EnvCrashed(f"webshop: {target.method} {url} failed: {e}") from e
        return parse_page(html)


_INSTANCE_NUMBERS = itertools.count()
_SERVER_LOCK = threading.Lock()
_SHARED_SERVER: list[Any] = []
"""The in-process product server (loading the products takes minutes): made once, shared."""


class InProcessShop:
    """WebShop's `WebAgentTextEnv` (text mode) in this process."""

    def __init__(self, text_env_class: type, num_products: int | None):
        prefix = f"ipr{next(_INSTANCE_NUMBERS)}_"
        with _SERVER_LOCK:
            if _SHARED_SERVER:
                self._env = text_env_class(
                    observation_mode="text", server=_SHARED_SERVER[0], session_prefix=prefix
                )
            else:
                self._env = text_env_class(
                    observation_mode="text",
                    num_products=num_products,
                    human_goals=True,
                    session_prefix=prefix,
                )
                _SHARED_SERVER.append(self._env.server)
        self.num_goals = len(self._env.server.goals)

    def open(self, goal: int) -> Page:
        return self._call(lambda: self._env.reset(session=goal))

    def search(self, page: Page, keywords: str) -> Page:
        return self._call(lambda: self._env.step(f"search[{keywords}]"))

    def click(self, page: Page, value: str) -> Page:
        return self._call(lambda: self._env.step(f"click[{value}]"))

    def close(self) -> None:
        """The shared server stays for the process's other instances."""

    def _call(self, call: Callable[[], Any]) -> Page:
        try:
            outcome = call()
            html = self._env.state["html"]
        except Exception as e:  # WebShop's own code failed: the environment's fault
            raise EnvCrashed(f"webshop: WebAgentTextEnv failed: {e!r}") from e
        page = parse_page(html)
        if len(outcome) == 4 and outcome[2]:  # step() -> (observation, reward, done, info)
            page.reward = float(outcome[1])
        return page


def make_shop() -> Shop:
    """The WebShop configured in the environment: `WEBSHOP_URL`, else `web_agent_site`."""
    url = os.environ.get("WEBSHOP_URL", "").strip()
    if url:
        return HttpShop(url, _int_env("WEBSHOP_NUM_GOALS", DEFAULT_NUM_GOALS))
    try:
        from web_agent_site.envs.web_agent_text_env import WebAgentTextEnv
    except ImportError as e:
        raise InputError(
            "webshop",
            f"WebShop is not installed here ({e}): set WEBSHOP_URL to a running WebShop app "
            "or install WebShop so that web_agent_site is importable (see data/README.md)",
        ) from e
    return InProcessShop(WebAgentTextEnv, _int_env("WEBSHOP_NUM_PRODUCTS", 0) or None)


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit():
        raise InputError("environment", f"{raw!r} is not a whole number", field=name)
    return int(raw)


class WebShopEnv:
    """WebShop as an `Env`, over any `Shop`."""

    env_id = ENV_ID
    max_steps = MAX_STEPS
    action_hint = ACTION_HINT

    def __init__(self, shop: Shop):
        self._shop = shop
        self._page: Page | None = None
        self._last: StepResult | None = None
        self._steps = 0

    def task_ids(self, split: str) -> list[str]:
        return [f"{split}-{goal}" for goal in self._goals(split)]

    def reset(self, task_id: str) -> EnvTask:
        split, _, goal = task_id.partition("-")
        if split not in SPLITS or not goal.isdigit() or int(goal) not in self._goals(split):
            raise ValueError(f"{ENV_ID}: unknown task id {task_id!r}")
        self._page = self._shop.open(int(goal))
        self._steps = 0
        self._last = StepResult(self._page.text, done=False, reward=0.0)
        return EnvTask(
            env_id=ENV_ID,
            task_id=task_id,
            split=split,
            instruction=self._page.instruction,
            initial_observation=self._page.text,
            action_hint=self.action_hint,
        )

    def step(self, action: str) -> StepResult:
        if self._last is None or self._page is None:
            raise RuntimeError(f"{ENV_ID}: step() before reset()")
        if self._last.done:
            return self._last
        self._steps += 1
        page, problem = self._act(" ".join(action.split())[:MAX_ACTION_CHARS])
        out_of_steps = self._steps >= MAX_STEPS
        if problem is not None:
            self._last = StepResult(f"Invalid action: {problem}", done=out_of_steps, reward=0.0)
            return self._last
        self._page = page
        if page.reward is not None:
            self._last = StepResult(page.text, done=True, reward=min(max(page.reward, 0.0), 1.0))
        else:
            self._last = StepResult(page.text, done=out_of_steps, reward=0.0)
        return self._last

    def gold_actions(self) -> list[str] | None:
        """WebShop ships human demonstrations, not a gold path per goal."""
        return None

    def close(self) -> None:
        self._shop.close()

    def _act(self, action: str) -> tuple[Page, str | None]:
        """The next page, or the current one and why the action cannot be executed."""
        page = self._page
        assert page is not None
        match = _ACTION.fullmatch(action)
        if match is None:
            return page, "write search[keywords] or click[value]."
        kind, argument = match.group(1), match.group(2).strip()
        if kind == "search" and page.search is None:
            return page, "this page has no search box; click[Back to Search] first."
        if kind == "search" and not argument:
            return page, "search[...] needs keywords."
        if kind == "search":
            return self._shop.search(page, argument), None
        if argument.lower() not in page.clickables:
            return page, f"there is no {argument!r} to click on this page."
        return self._shop.click(page, argument), None

    def _goals(self, split: str) -> range:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
        start, end = SPLITS[split]
        return range(start, min(end or self._shop.num_goals, self._shop.num_goals))


def make_webshop_env() -> WebShopEnv:
    return WebShopEnv(make_shop())
