"""The web pages end to end, in headless Chromium (Debian's, driven by Playwright) against a real stack: a
streamed chat answer, a thumbs click that reaches the store, regenerate and a comparison, a ranking from the
labeling view, the operator console showing new counts, refusing a second run (409) and an app key (403).
Screenshots of each page go to test-artifacts/web/ (git-ignored)."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from alignloop import store
from alignloop.store.schema import Feedback
from tests.conftest import REPO

pytestmark = pytest.mark.integration
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts" / "web"
TIMEOUT_MS = 60_000  # a tiny-model answer takes a second or two; the margin is for a loaded 2-core machine

# At module level, so that a machine without the browser does not start a stack only to skip.
if not CHROMIUM.exists():
    pytest.skip(f"no Chromium at {CHROMIUM}: scripts/bootstrap.sh installs Debian's `chromium` when run as "
                "root (or: apt-get install -y chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def browser() -> Iterator:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        # A short TMPDIR of its own: in-process vLLM engines of earlier tests point this process's TMPDIR deep
        # into their temporary homes, past the length Chromium allows for its singleton socket path.
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"],
                                      env={**os.environ, "TMPDIR": "/tmp"})
        yield chromium
        chromium.close()


class Tab:
    """A fresh browser tab that remembers every URL it requested and every error its console printed."""

    def __init__(self, browser, gateway: str) -> None:
        self.context = browser.new_context(viewport={"width": 1100, "height": 800}, base_url=gateway)
        self.context.set_default_timeout(TIMEOUT_MS)
        self.page = self.context.new_page()
        self.urls: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.urls.append(r.url))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def sign_in(self, path: str, key: str) -> None:
        self.page.goto(path)
        self.page.get_by_label("key").fill(key)
        self.page.get_by_role("button", name="Sign in").click()

    def shot(self, name: str) -> None:
        # JPEG keeps a full page in tens of kilobytes.
        self.page.screenshot(path=ARTIFACTS / f"{name}.jpg", type="jpeg", quality=60, full_page=True)

    def script_errors(self) -> list[str]:
        """Console errors other than the browser's note on a refused request (a 403 a test asked for)."""
        return [e for e in self.errors if "Failed to load resource" not in e]

    def close(self, *keys: str) -> None:
        leaked = [u for u in self.urls for k in keys if k in u]
        self.context.close()
        assert not leaked, f"a key appeared in a URL: {leaked}"


@pytest.fixture
def tab(browser, stack) -> Iterator[Callable[[], Tab]]:
    tabs: list[Tab] = []

    def open_tab() -> Tab:
        tabs.append(Tab(browser, stack.gateway))
        return tabs[-1]

    yield open_tab
    for t in tabs:
        t.close(stack.credentials["app_key"], stack.credentials["operator_key"])


def operator(stack) -> httpx.Client:
    return stack.operator_client()


def totals(stack) -> dict[str, int]:
    """Today's feedback counts over all model versions, from the operator API."""
    with operator(stack) as ops:
        stats = ops.get("/v1/admin/feedback/stats", params={"days": 1}).raise_for_status().json()
    rows = stats["by_model_version"]
    keys = ("total", "thumbs_up", "thumbs_down", "ratings", "rankings", "comparisons", "flagged")
    return {k: sum(r[k] for r in rows) for k in keys}


def wait_for_counts(stack, before: dict[str, int], **more: int) -> dict[str, int]:
    """Polls until every named count grew by at least its amount: the materializer writes asynchronously."""
    deadline = time.monotonic() + 30
    while True:
        now = totals(stack)
        if all(now[k] >= before[k] + n for k, n in more.items()):
            return now
        if time.monotonic() > deadline:
            pytest.fail(f"counts did not grow by {more}: before {before}, now {now}")
        time.sleep(0.5)


def stored(stack, **where) -> list[Feedback]:
    engine = store.connect(f"sqlite:///{stack.home / 'feedback.db'}")
    try:
        deadline = time.monotonic() + 30
        while True:
            with Session(engine) as session:
                rows = list(session.scalars(select(Feedback).filter_by(**where)))
            if rows or time.monotonic() > deadline:
                return rows
            time.sleep(0.5)
    finally:
        engine.dispose()


def ask(page, message: str, max_tokens: int = 48) -> None:
    page.get_by_text("Sampling settings").click()
    page.get_by_label("Longest answer (tokens)").fill(str(max_tokens))
    page.get_by_label("Temperature").fill("1")
    page.get_by_label("Your message").fill(message)
    page.get_by_label("Your message").press("Enter")


# Records every text the first answer shows while it streams, to tell a streamed answer from one that
# appears all at once.
WATCH_STREAM = """() => {
  window.__seen = [];
  new MutationObserver(() => {
    const text = document.querySelector('.turn.assistant .answer .text');
    if (text) window.__seen.push(text.textContent.length);
  }).observe(document.getElementById('conversation'), {subtree: true, childList: true, characterData: true});
}"""


def test_chat_streams_an_answer_and_a_thumbs_click_lands_in_the_store(stack, tab):
    t = tab()
    page = t.page
    t.sign_in("/", stack.credentials["app_key"])
    page.get_by_label("Your message").wait_for()
    assert page.evaluate("sessionStorage.getItem('alignloop.app_key')") == stack.credentials["app_key"]
    page.evaluate(WATCH_STREAM)
    ask(page, "Tell me about feedback loops.")

    answer = page.locator('.answer[data-status="done"]')
    answer.wait_for()
    text = answer.locator(".text").inner_text()
    assert text.strip(), "the streamed answer is empty"
    lengths = sorted(set(page.evaluate("window.__seen")) - {0})
    assert len(lengths) >= 2, f"the answer did not appear piece by piece: {lengths}"
    completion_id = answer.get_attribute("data-completion-id")
    assert completion_id and completion_id.startswith("cmpl-")

    before = totals(stack)
    answer.get_by_text("Comment and flags (optional)").click()
    answer.get_by_label("Comment", exact=True).fill("Clear, but it invents a source.")
    answer.get_by_label("Makes up facts (hallucination)").check()
    thumbs_up = answer.get_by_role("button", name="Thumbs up: answer 1 is good")
    thumbs_up.click()
    answer.get_by_text("Thanks: thumbs up saved.").wait_for()
    assert thumbs_up.get_attribute("aria-pressed") == "true"
    wait_for_counts(stack, before, thumbs_up=1, flagged=1)
    [row] = stored(stack, completion_id=completion_id, kind="thumbs")
    assert row.thumbs_up is True and row.comment == "Clear, but it invents a source." and row.hallucination
    t.shot("chat")
    assert not t.script_errors()


def test_regenerate_keeps_both_answers_rateable_and_the_pick_is_a_comparison(stack, tab):
    t = tab()
    page = t.page
    t.sign_in("/", stack.credentials["app_key"])
    ask(page, "Suggest a name for a cat.", max_tokens=24)
    page.locator('.answer[data-status="done"]').first.wait_for()
    page.get_by_role("button", name="Regenerate").click()
    page.locator('.answer[data-status="done"]').nth(1).wait_for()

    answers = page.locator(".answer")
    assert answers.count() == 2
    first, second = (answers.nth(i).get_attribute("data-completion-id") for i in range(2))
    assert first != second
    before = totals(stack)
    # Both stay rateable: a thumb on the first answer, then the second is picked as the better one.
    page.get_by_role("button", name="Thumbs down: answer 1 is bad").click()
    answers.nth(0).get_by_text("Thanks: thumbs down saved.").wait_for()
    answers.nth(1).get_by_role("button", name="Prefer this answer").click()
    answers.nth(1).get_by_text("your choice was saved").wait_for()
    assert answers.nth(1).get_by_role("button", name="Preferred ✓").get_attribute("aria-pressed") == "true"
    wait_for_counts(stack, before, thumbs_down=1, comparisons=1)
    [row] = stored(stack, kind="comparison", preferred_completion_id=second)
    assert row.completion_ids == [first, second]
    t.shot("chat-regenerate")
    assert not t.script_errors()


def test_labeling_submits_ratings_and_a_ranking_ordered_by_drag_and_by_keyboard(stack, tab):
    t = tab()
    page = t.page
    t.sign_in("/label", stack.credentials["app_key"])
    page.get_by_label("Prompt").fill("Explain what a reward model is.")
    page.get_by_label("Answers to compare (K)").fill("3")
    page.get_by_label("Longest answer (tokens)").fill("24")
    page.get_by_role("button", name="Sample answers").click()
    cards = page.locator("article.card")
    cards.nth(2).wait_for()
    assert cards.count() == 3
    ids = {letter: cards.nth(i).get_attribute("data-completion-id") for i, letter in enumerate("ABC")}

    # Submitting before every answer is rated is refused, plainly.
    page.get_by_role("button", name="Submit ratings and ranking").click()
    page.get_by_role("alert").filter(has_text="Rate every answer").wait_for()

    for letter, value in zip("ABC", ("3", "6", "5"), strict=True):
        card = page.locator(f"#answer-{letter}")
        card.get_by_role("radio", name=value, exact=True).check()
    page.locator("#answer-A").get_by_label("Fails to follow the instruction").check()

    # Keyboard: answer C up twice (to the top); then a drag puts B above C.
    page.get_by_role("button", name="Move answer C up").click()
    page.get_by_role("button", name="Move answer C up").click()
    assert page.get_by_role("button", name="Move answer C up").is_disabled()
    page.locator('.rank-item[data-letter="B"]').drag_to(page.locator('.rank-item[data-letter="C"]'),
                                                          target_position={"x": 20, "y": 3})
    order = page.locator(".rank-item").evaluate_all("items => items.map(i => i.dataset.letter)")
    assert order == ["B", "C", "A"], order

    before = totals(stack)
    page.get_by_role("button", name="Submit ratings and ranking").click()
    page.get_by_text("Saved: 3 ratings and 1 ranking").wait_for()
    wait_for_counts(stack, before, ratings=3, rankings=1, flagged=1)
    [ranking] = stored(stack, kind="ranking", completion_id=ids["B"])
    assert ranking.completion_ids == [ids["B"], ids["C"], ids["A"]]
    t.shot("label")
    assert not t.script_errors()


def give_feedback(stack) -> None:
    """Two answers to one prompt, a thumbs up on one and a ranking of both, through the API."""
    app = {"Authorization": f"Bearer {stack.credentials['app_key']}"}
    with httpx.Client(base_url=stack.gateway, headers=app, timeout=60) as client:
        reply = client.post("/v1/chat/completions", json={
            "model": "alignloop-policy", "n": 2, "max_tokens": 8,
            "messages": [{"role": "user", "content": "Two answers, please."}]}).raise_for_status().json()
        a, b = (c["completion_id"] for c in reply["choices"])
        client.post("/v1/feedback/batch", json={"items": [
            {"kind": "thumbs", "completion_id": a, "value": "up"},
            {"kind": "ranking", "completion_ids": [b, a]}]}).raise_for_status()


def enough_pairs_to_train_a_reward_model(stack) -> None:
    """Four rankings of four answers (24 pairs, beyond the runner's min_pairs of 20), so that a run started now
    goes on to train an RM instead of stopping after its snapshot: it lasts long enough to be cancelled."""
    app = {"Authorization": f"Bearer {stack.credentials['app_key']}"}
    before = totals(stack)
    with httpx.Client(base_url=stack.gateway, headers=app, timeout=60) as client:
        for i in range(4):
            reply = client.post("/v1/chat/completions", json={
                "model": "alignloop-policy", "n": 4, "max_tokens": 8,
                "messages": [{"role": "user", "content": f"Four answers to question {i}, please."}]},
            ).raise_for_status().json()
            client.post("/v1/feedback", json={
                "kind": "ranking", "completion_ids": [c["completion_id"] for c in reply["choices"]]},
            ).raise_for_status()
    wait_for_counts(stack, before, rankings=4)


def test_console_shows_the_new_counts_and_refuses_a_second_run(stack, tab):
    enough_pairs_to_train_a_reward_model(stack)
    t = tab()
    page = t.page
    t.sign_in("/console", stack.credentials["operator_key"])
    champion = page.locator("#versions tr", has=page.locator('[data-col="aliases"]', has_text="champion"))
    champion.wait_for()
    cols = ("thumbs_up", "rankings", "total")
    shown = {c: int(champion.locator(f'[data-col="{c}"]').inner_text()) for c in cols}

    before = totals(stack)
    give_feedback(stack)
    wait_for_counts(stack, before, thumbs_up=1, rankings=1)
    page.get_by_role("button", name="Refresh").click()
    for col, grew in (("thumbs_up", 1), ("rankings", 1), ("total", 2)):
        expect(champion.locator(f'[data-col="{col}"]')).to_have_text(str(shown[col] + grew))
    # The same figures as the API's.
    version = champion.get_attribute("data-version")
    with operator(stack) as ops:
        listing = ops.get("/v1/admin/models/versions", params={"days": 30}).raise_for_status().json()
    feedback = next(v for v in listing["data"] if v["version"] == version)["feedback"]
    for col in ("thumbs_up", "thumbs_down", "rankings", "comparisons", "ratings", "total"):
        assert champion.locator(f'[data-col="{col}"]').inner_text().split()[0] == str(feedback[col]), col
    # Usage by tenant, as the API reports it: the default application has chatted on this stack.
    with operator(stack) as ops:
        usage = ops.get("/v1/admin/usage", params={"days": 30}).raise_for_status().json()
    app = next(u for u in usage["by_tenant"] if u["name"] == "default")
    row = page.locator(f'#usage tr[data-tenant="{app["tenant"]}"]')
    expect(row.locator("th")).to_have_text("default")
    for col in ("requests", "cached_prompt_tokens", "total_tokens"):
        assert int(row.locator(f'[data-col="{col}"]').inner_text().replace(",", "")) == app[col], col
    page.locator("#chart-feedback svg circle").first.wait_for()
    page.locator("#chart-thumbs svg circle").first.wait_for()
    t.shot("console")

    # One run at a time: the second start is refused with the API's 409, shown as it is.
    page.get_by_label("Reason (optional)").fill("web test")
    page.get_by_role("button", name="Start a run").click()
    started = page.get_by_role("status").filter(has_text="started")
    started.wait_for()
    run_id = started.inner_text().split()[1]
    try:
        page.get_by_role("button", name="Start a run").click()
        refused = page.locator("#runs-error")
        refused.filter(has_text="409").wait_for()
        assert "pipeline_run_in_progress" in refused.inner_text() and run_id in refused.inner_text()
        card = page.locator(f'article.run[data-run-id="{run_id}"]')
        card.locator("progress").first.wait_for()
        # The parent MLflow run exists once the runner picked the run up; the page polls while it is active.
        expect(card.locator(".run-head a")).to_have_attribute(
            "href", re.compile(re.escape(f"{stack.mlflow}/#/runs/") + "[0-9a-f]{32}$"), timeout=TIMEOUT_MS)
        t.shot("console-runs")
        card.get_by_role("button", name=f"Cancel run {run_id}").click()
        card = page.locator(f'article.run[data-run-id="{run_id}"][data-status="cancelled"]')
        card.wait_for()
    finally:
        # Never leave a run going on the shared stack.
        with operator(stack) as ops:
            ops.post(f"/v1/admin/pipelines/runs/{run_id}/cancel")
            deadline = time.monotonic() + 60
            while ops.get(f"/v1/admin/pipelines/runs/{run_id}").json()["status"] in ("queued", "running"):
                assert time.monotonic() < deadline, f"run {run_id} did not stop"
                time.sleep(1)
    assert not t.script_errors()


def test_console_refuses_an_app_key_plainly(stack, tab):
    t = tab()
    page = t.page
    t.sign_in("/console", stack.credentials["app_key"])
    error = page.locator("#sign-in-error")
    error.filter(has_text="403").wait_for()
    assert "operator_key_required" in error.inner_text() and "not an operator key" in error.inner_text()
    assert page.locator("#console").is_hidden()
    assert page.evaluate("sessionStorage.getItem('alignloop.operator_key')") is None
    t.shot("console-refused")
    assert not t.script_errors()
