"""The operator's path through the two web UIs, in a real browser.

Headless Chromium (Debian's ``chromium`` package, which ``make install`` adds where it runs as
root with apt) driven by Playwright: Playwright is told where the browser is and never downloads
one. In the Prefect UI the test opens the full-pipeline deployment, starts a custom run from the
parameter form (the config as JSON, ``until_stage`` picked from its list) and watches the run
page until the run completes; in the MLflow UI it finds that run's pipeline parent run, unfolds
it and opens its stage run. Screenshots of every step go to a folder the test prints.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Locator, Page, expect, sync_playwright
from prefect.client.orchestration import get_client

from .faults import Clock

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
EXPERIMENT = "tiny-ui"  # an experiment of its own: the run tree the UI shows is this test's alone
FINAL = re.compile(r"^(Completed|Failed|Crashed|Cancelled|TimedOut)$")

pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no {CHROMIUM}: `make install` as root installs Debian's chromium"),
]


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Page]:
    """A fresh headless Chromium page (no saved UI preferences), closed after the test."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)  # 2 cores, a busy worker: the UIs can be slow to answer
            yield page
        finally:
            browser.close()


class Screens:
    """Numbered full-page screenshots in one folder."""

    def __init__(self, page: Page, folder: Path):
        self.page, self.folder, self.count = page, folder, 0
        folder.mkdir(parents=True, exist_ok=True)

    def shoot(self, name: str) -> None:
        self.count += 1
        self.page.screenshot(path=self.folder / f"{self.count:02d}-{name}.png", full_page=True)


def _field(page: Page, parameter: str):
    """The block of one top-level parameter in Prefect's run form: its label, menu and input."""
    label = page.get_by_text(f"{parameter} (Optional)", exact=True)
    return label.locator("xpath=ancestor::div[.//fieldset][1]")


def _editor_text(editor: Locator) -> str:
    """A CodeMirror editor's whole document, read from its state rather than its drawn lines."""
    return editor.evaluate("content => content.cmView.view.state.doc.toString()")


def _replace_editor_text(editor: Locator, text: str) -> None:
    """Select all of a CodeMirror editor's text and paste ``text`` over it, as an operator would.

    The editor draws only the lines in view, so a DOM selection (what ``Locator.fill`` makes)
    can miss the lines out of view and leave some of the old text behind the new. And the form
    fills the editor with the deployment's default config a moment after showing it: text typed
    before that is overwritten. So the test waits until the editor holds a config that stays put,
    selects all with the editor's own Ctrl+A, pastes, and reads the whole document back.
    """
    editor.wait_for()
    before = None
    for _ in range(120):  # a minute at most
        now = _editor_text(editor)
        if now.strip() and now == before:
            break
        before = now
        editor.page.wait_for_timeout(500)
    else:
        raise AssertionError(f"the config editor never settled; it holds {now[:200]!r}")
    editor.click()
    editor.press("Control+a")
    editor.page.keyboard.insert_text(text)
    editor.page.wait_for_timeout(500)
    assert _editor_text(editor) == text


def _submit(page: Page, tries: int = 3) -> int:
    """Click Submit until the server creates the flow run; return the clicks it took.

    Prefect's server on SQLite answers 503 ("database is locked") now and then while the worker
    and the services write (PrefectHQ/prefect#16102); its Python client retries, the UI shows
    "Unknown error while creating flow run" and the operator clicks again. So does this test.
    """
    for attempt in range(1, tries + 1):
        with page.expect_response(lambda r: r.url.endswith("/create_flow_run")) as answer:
            page.get_by_role("button", name="Submit").click()
        if answer.value.ok:
            return attempt
        print(f"Submit {attempt}: the server answered {answer.value.status}; clicking again")
        assert answer.value.status == 503, answer.value.text()
        page.wait_for_timeout(2000)
    raise AssertionError(f"the server refused the run {tries} times")


def test_custom_run_from_the_prefect_ui_then_its_run_tree_in_the_mlflow_ui(svc, page, tmp_path):
    store = tmp_path / "store"
    config = svc.tiny_config(store)
    config["tracking"] = {"experiment": EXPERIMENT}
    screens = Screens(page, tmp_path / "screens")
    print(f"\nscreenshots: {screens.folder}")
    clock = Clock()

    # Prefect: deployment -> Run -> Custom run -> the form -> Submit -> the run's page.
    page.goto(svc.env["PREFECT_API_URL"].removesuffix("/api") + "/")
    page.get_by_role("link", name="Deployments").click()
    page.get_by_role("link", name="full-pipeline").click()
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Custom run").click()
    config_field = _field(page, "config")
    config_field.wait_for()
    clock.mark("prefect form open")
    config_field.get_by_role("button", name="Open menu").first.click()  # the config's own menu: type it as JSON
    page.get_by_role("menuitem", name="Use JSON Input").click()
    _replace_editor_text(config_field.locator(".cm-content"), json.dumps(config, indent=2))
    until = _field(page, "until_stage")
    until.get_by_role("tab", name="str").click()  # from None to a stage name
    until.get_by_role("button", name="Select").click()
    page.get_by_role("option", name="ingest", exact=True).click()
    screens.shoot("prefect-custom-run-form")
    attempts = _submit(page)
    page.get_by_role("button", name="View run").click()
    page.wait_for_url("**/runs/flow-run/**")
    flow_run_id = re.search(r"/runs/flow-run/([0-9a-f-]{36})", page.url).group(1)
    clock.mark(f"run submitted ({attempts} click{'s' if attempts > 1 else ''})")
    page.get_by_role("tab", name="Subflow Runs").wait_for()  # the run's page, not the deployment's list of runs
    state = page.locator("[data-slot=badge]").filter(has_text=FINAL).first
    state.wait_for(timeout=600_000)
    clock.mark(f"run page shows {state.inner_text()}")
    page.get_by_role("tab", name="Subflow Runs").click()
    page.get_by_text("ingest-tiny", exact=True).wait_for()  # the stage's own flow run, under the pipeline's
    screens.shoot("prefect-flow-run")
    assert state.inner_text() == "Completed"
    with get_client(sync_client=True) as client:  # the form sent what the test typed and picked
        flow_run = client.read_flow_run(flow_run_id)
    parameters = flow_run.parameters
    assert flow_run.state.is_completed()
    assert parameters["until_stage"] == "ingest"
    assert parameters["config"] == config

    # MLflow: Model training -> the experiment -> unfold the pipeline run -> its stage run.
    page.goto(svc.mlflow_uri + "/")
    page.get_by_text("Model training", exact=True).first.click()
    page.get_by_role("link", name=EXPERIMENT, exact=True).first.click()
    parent = page.get_by_role("row").filter(has=page.get_by_role("link", name="tiny-pipeline", exact=True))
    parent.first.wait_for()
    assert parent.count() == 1  # one pipeline run in this experiment: the one started from the form
    parent.get_by_role("button").first.click()  # unfold its nested runs
    stage = page.get_by_role("link", name="ingest", exact=True)
    stage.wait_for()
    clock.mark("mlflow run tree unfolded")
    screens.shoot("mlflow-run-tree")
    stage.click()
    page.get_by_text("Parent run", exact=True).wait_for()
    page.get_by_role("link", name="tiny-pipeline").wait_for()  # the parent, linked from the stage run
    page.get_by_text(str(store / "ingest")).wait_for()  # the crucible.output tag: the folder in this test's store
    screens.shoot("mlflow-stage-run")
    clock.mark("mlflow stage run open")
    clock.report("Prefect custom run and MLflow run tree, in Chromium")
    assert page.get_by_text(": ran", exact=True).is_visible()  # crucible.state: the stage ran for the form's run
