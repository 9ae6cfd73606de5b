"""FIXTURE standing in for WebShop's product data, which cannot be obtained or run here.

A tiny WSGI app on 127.0.0.1 that serves hand-written pages shaped like WebShop's flask app
(web_agent_site/templates: search page, results, item page with option radios, a sub page,
the 'Buy Now' page with the score) under WebShop's URL scheme, for three made-up products and
two goals. Its score is the fixture's own (0.5 for the right product, 0.25 per right option),
NOT WebShop's reward function: the tests check the adapter's parsing and protocol, not
WebShop's scoring.
"""

from __future__ import annotations

import functools
import json
import re
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from html import escape
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

PRODUCTS = {
    "B0FIXRED01": {
        "title": "Red Cotton T-Shirt, Classic Fit",
        "price": "$19.99",
        "options": {"color": ["red", "blue"], "size": ["s", "m", "l"]},
    },
    "B0FIXBLU02": {
        "title": "Blue Polyester T-Shirt",
        "price": "$35.0",
        "options": {"size": ["m", "l"]},
    },
    "B0FIXMUG03": {"title": "Ceramic Coffee Mug, 12 oz", "price": "$9.5", "options": {}},
}
GOALS = [
    {
        "instruction": "i need a red cotton t-shirt in size m, and price lower than 30.00 dollars",
        "asin": "B0FIXRED01",
        "options": {"color": "red", "size": "m"},
    },
    {"instruction": "i want a ceramic coffee mug", "asin": "B0FIXMUG03", "options": {}},
]
PAGE_SIZE = 2


def _page(body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html>\n  <head>\n    <title>WebShop</title>\n"
        "    <style>body { margin: 0; }</style>\n    <script>var x = 1;</script>\n  </head>\n"
        f"  <body>\n    <!-- fixture page -->\n{body}\n  </body>\n</html>\n"
    )


def _instruction(goal: dict[str, Any], query: str | None = None) -> str:
    query_line = f"\n        <h4>Current Query: {escape(query)}</h4>" if query is not None else ""
    return (
        '      <div id="instruction-text">\n'
        f"        <h4>Instruction: <br>{escape(goal['instruction'])}</h4>{query_line}\n"
        "      </div>\n"
    )


def _button(action: str, label: str) -> str:
    return (
        f'      <form method="post" action="{escape(action)}">\n'
        f'        <button type="submit" class="btn btn-primary">{escape(label)}</button>\n'
        "      </form>\n"
    )


def _search_page(session: str, goal: dict[str, Any]) -> str:
    return _page(
        '      <div id="logo"><h2>WebShop</h2></div>\n'
        + _instruction(goal)
        + f'      <form method="post" action="/{session}">\n'
        '        <input id="search_input" type="text" name="search_query" required/>\n'
        '        <button class="btn btn-success" type="submit"><i class="glyphicon"></i>Search'
        "</button>\n      </form>\n"
    )


def _results_page(session: str, goal: dict[str, Any], keywords: str, page: int) -> str:
    words = set(keywords.split())
    hits = [
        a for a, p in PRODUCTS.items() if words & set(re.findall(r"[\w-]+", p["title"].lower()))
    ]
    shown = hits[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
    quoted = urllib.parse.quote(keywords)
    body = _instruction(goal, keywords) + f"      <h1>Results</h1>\n      <p>Page {page} of "
    body += f"{len(hits)} total results</p>\n" + _button(f"/{session}", "Back to Search")
    if page > 1:
        body += _button(f"/search_results/{session}/{quoted}/{page - 1}", "< Prev")
    if page * PAGE_SIZE < len(hits):
        body += _button(f"/search_results/{session}/{quoted}/{page + 1}", "Next >")
    for asin in shown:
        item = f"/item_page/{session}/{asin}/{quoted}/{page}/{{}}"
        body += (
            f'      <h4 class="product-asin"><a class="product-link" href="{escape(item)}">'
            f"{asin}</a></h4>\n"
            # WebShop's results template closes these <h4> with </h5>.
            f'      <h4 class="product-title">{escape(PRODUCTS[asin]["title"])}</h5>\n'
            f'      <h5 class="product-price">{PRODUCTS[asin]["price"]}</h6>\n'
        )
    return _page(body)


def _item_page(session: str, goal: dict[str, Any], asin: str, rest: list[str]) -> str:
    keywords, page, options_json = rest
    quoted, options = urllib.parse.quote(keywords), json.loads(options_json)
    product = PRODUCTS[asin]
    body = _instruction(goal, keywords) + _button(f"/{session}", "Back to Search")
    body += _button(f"/search_results/{session}/{quoted}/{page}", "< Prev")
    for name, values in product["options"].items():
        body += f"      <h4>{escape(name)}</h4>\n"
        for i, value in enumerate(values):
            chosen = urllib.parse.quote(json.dumps({**options, name: value}))
            url = f"/item_page/{session}/{asin}/{quoted}/{page}/{chosen}"
            body += (
                f'      <input type="radio" id="radio_{name}{i}" name="{name}" value="{value}" '
                f'data-url="{escape(url)}">\n'
                f'      <label for="radio_{name}{i}">{escape(value)}</label>\n'
            )
    encoded = urllib.parse.quote(json.dumps(options))
    body += f"      <h2>{escape(product['title'])}</h2>\n      <h4>Price: {product['price']}</h4>\n"
    body += _button(
        f"/item_sub_page/{session}/{asin}/{quoted}/{page}/Description/{encoded}", "Description"
    )
    body += _button(f"/done/{session}/{asin}/{encoded}", "Buy Now")
    return _page(body)


def _description_page(session: str, goal: dict[str, Any], asin: str, rest: list[str]) -> str:
    keywords, page, _, options_json = rest
    quoted, options = urllib.parse.quote(keywords), urllib.parse.quote(options_json)
    back = f"/item_page/{session}/{asin}/{quoted}/{page}/{options}"
    body = _instruction(goal) + _button(f"/{session}", "Back to Search") + _button(back, "< Prev")
    body += f"      <p>{escape(PRODUCTS[asin]['title'])}: made for this test only.</p>\n"
    return _page(body)


def fixture_score(goal: dict[str, Any], asin: str, options: dict[str, str]) -> float:
    """The fixture's score (not WebShop's formula)."""
    if asin != goal["asin"]:
        return 0.0
    wanted = goal["options"]
    if not wanted:
        return 1.0
    return 0.5 + 0.5 * sum(options.get(k) == v for k, v in wanted.items()) / len(wanted)


def _done_page(goal: dict[str, Any], asin: str, options_json: str) -> str:
    score = fixture_score(goal, asin, json.loads(options_json))
    return _page(
        '      <div id="thankyou"><h1>Thank you for shopping with us!</h1></div>\n'
        '      <div id="stats">\n'
        f'        <h4 id="asin">asin<pre>{asin}</pre></h4>\n'
        f'        <h3 id="reward">Your score (min 0.0, max 1.0)<pre>{score}</pre></h3>\n'
        "      </div>\n"
    )


def gold_actions(goal_index: int) -> list[str]:
    """A path to the fixture's full score for goal `goal_index` (goals repeat GOALS)."""
    goal = GOALS[goal_index % len(GOALS)]
    title = PRODUCTS[goal["asin"]]["title"]
    keywords = " ".join(re.findall(r"[a-z]+", title.lower())[:3])
    options = [f"click[{value}]" for value in goal["options"].values()]
    return [f"search[{keywords}]", f"click[{goal['asin']}]", *options, "click[Buy Now]"]


def app(
    environ: dict[str, Any], start_response: Callable[..., Any], num_goals: int = len(GOALS)
) -> Iterable[bytes]:
    """The fixture shop: WebShop's routes, the fixture's pages; goal i is GOALS[i % 2]."""
    parts = environ["PATH_INFO"].strip("/").split("/")  # wsgiref has decoded %XX already
    route, session = parts[0], parts[1] if len(parts) > 1 else parts[0]
    try:
        index = int(session.split("_")[-1])
    except ValueError:
        index = num_goals
    if index >= num_goals:
        start_response("500 INTERNAL SERVER ERROR", [("Content-Type", "text/plain")])
        return [b"no such goal"]
    goal = GOALS[index % len(GOALS)]
    if len(parts) == 1 and environ["REQUEST_METHOD"] == "POST":
        size = int(environ.get("CONTENT_LENGTH") or 0)
        form = urllib.parse.parse_qs(environ["wsgi.input"].read(size).decode())
        if "search_query" in form:
            keywords = urllib.parse.quote(form["search_query"][0].lower())
            start_response("302 FOUND", [("Location", f"/search_results/{session}/{keywords}/1")])
            return [b""]
    if len(parts) == 1:
        html = _search_page(session, goal)
    elif route == "search_results":
        html = _results_page(session, goal, parts[2], int(parts[3]))
    elif route == "item_page":
        html = _item_page(session, goal, parts[2], parts[3:])
    elif route == "item_sub_page":
        html = _description_page(session, goal, parts[2], parts[3:])
    elif route == "done":
        html = _done_page(goal, parts[2], parts[3])
    else:
        start_response("404 NOT FOUND", [("Content-Type", "text/plain")])
        return [b"not found"]
    start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
    return [html.encode()]


class FixtureServer(WSGIServer):
    """The fixture's server; `crash_once()` makes it drop the next request unanswered, as a
    WebShop app does when it dies and its supervisor starts it again."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.crash_pending = threading.Event()

    def crash_once(self) -> None:
        self.crash_pending.set()


class _QuietHandler(WSGIRequestHandler):
    server: FixtureServer

    def handle(self) -> None:
        if self.server.crash_pending.is_set():
            self.server.crash_pending.clear()
            return  # the connection closes with no response
        super().handle()

    def log_message(self, format: str, *args: Any) -> None:
        """No access log in the test output."""


RUNNING: dict[str, FixtureServer] = {}
"""Servers by base URL, for tests that hold only an env."""


@contextmanager
def serve_fixture_shop(num_goals: int = len(GOALS)) -> Iterator[tuple[str, FixtureServer]]:
    """The fixture shop with `num_goals` goals on a free loopback port: (base URL, server)."""
    server = make_server(
        "127.0.0.1", 0, functools.partial(app, num_goals=num_goals),
        server_class=FixtureServer, handler_class=_QuietHandler,
    )  # fmt: skip
    url = f"http://127.0.0.1:{server.server_port}"
    RUNNING[url] = server
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield url, server
    finally:
        del RUNNING[url]
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
