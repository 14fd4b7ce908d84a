"""The dashboard as users run it: `llmplan ui` in its own process, submitting to the session's Ray cluster,
driven through its API and, end to end, through Debian's chromium (headless, by Selenium and chromedriver).

As root (CI), the dashboard runs without root's power to read any file (setpriv drops CAP_DAC_OVERRIDE and
CAP_DAC_READ_SEARCH), so that a file's mode bits mean to it what they mean to any other user.

The browser test saves a screenshot to $LLMPLAN_ARTIFACTS, else artifacts/ at the repository root. Without
chromium, chromedriver or selenium it skips locally and fails in CI ($CI set), where .ci/run installs them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.error import HTTPError

import pytest

pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # a Ray head, SmolLM2 jobs and the browser

from ci_required import unavailable  # noqa: E402
from llmplan.runtime.store.opening import open_store  # noqa: E402
from llmplan.runtime.store.repository import JobStatus, get_job, get_job_details  # noqa: E402

from ..conftest import TEST_CACHE  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
EXAMPLE_DATA = REPO / "examples" / "data" / "alpaca_llmplan.jsonl"
LLMPLAN = str(Path(sys.executable).with_name("llmplan"))
STARTED = re.compile(r"llmplan dashboard on (http://\S+?)/?\s")
# A fine-tuning run small enough for a CPU: SmolLM2 LoRA, short sequences, two sequences a step.
SMALL_RUN = {"model": "smollm2-135m-instruct", "method": "lora", "precision": "fp32", "micro-batch": "2",
             "grad-accum": "1", "seq-len": "64"}
TINY_MODEL = "tiny-llama"  # the browser's run trains, merges and chats with the tiny Llama: the page's flow is the
# subject, and SmolLM2 would add its loads, steps and a 0.5 GB merge to it
HUMAN_TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")  # local time to the second
ENDED = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


@dataclass
class Dashboard:
    url: str
    root: Path  # its only --root, and its working directory
    db: str

    def call(self, path: str, body: dict | None = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method="GET" if body is None else "POST",
                                         headers={"Content-Type": "application/json"} if body is not None else {})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except HTTPError as error:
            return error.code, json.loads(error.read())

    def record(self, job_id: int, read: Callable = get_job) -> Any:
        engine = open_store(self.db)
        try:
            return read(engine, job_id)
        finally:
            engine.dispose()

    def wait_until_ended(self, job_id: int, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while (job := self.record(job_id)).status not in ENDED:
            assert time.monotonic() < deadline, f"job {job_id} still {job.status.value} after {timeout}s"
            time.sleep(0.5)
        return job


def without_root_reads() -> list[str]:
    """The command prefix that runs a program as root without the capabilities that let root read any file."""
    if os.geteuid() != 0:
        return []
    return [shutil.which("setpriv") or "setpriv", "--bounding-set=-dac_override,-dac_read_search"]


@pytest.fixture(scope="module")
def dashboard(ray_head, smollm2, tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    """`llmplan ui --root ROOT --port 0` (ROOT holding the example data as train.jsonl and the tiny Llama as
    tiny-llama/), submitting to the session's Ray cluster; SmolLM2 is in the shared test cache."""
    base = tmp_path_factory.mktemp("dashboard")
    root = base / "root"
    root.mkdir()
    shutil.copyfile(EXAMPLE_DATA, root / "train.jsonl")
    shutil.copytree(tiny_llama, root / TINY_MODEL)
    site = Dashboard(url="", root=root, db=f"sqlite:///{base / 'jobs.db'}")
    env = {**os.environ, "LLMPLAN_DB": site.db, "LLMPLAN_JOBS_DIR": str(base / "jobs"),
           "LLMPLAN_CACHE": str(TEST_CACHE), **ray_head.client_env(),
           "LLMPLAN_WARM_SECONDS": "30"}  # the chat's warm replica frees its memory soon
    log = base / "ui.log"
    with log.open("w") as sink:
        process = subprocess.Popen([*without_root_reads(), LLMPLAN, "ui", "--port", "0", "--root", str(root)],
                                   cwd=root, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        site.url = wait_for_address(process, log)
        yield site
    finally:
        process.terminate()
        process.wait(timeout=30)


def wait_for_address(process: subprocess.Popen, log: Path, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while not (started := STARTED.search(log.read_text())):
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"llmplan ui did not start: {log.read_text()[-2000:]}")
        time.sleep(0.1)
    return started.group(1)


# ---- the API ----------------------------------------------------------------------------------------------
def test_a_file_the_dashboard_cannot_read_is_refused_in_its_field(dashboard: Dashboard) -> None:
    unreadable = dashboard.root / "secret.jsonl"
    shutil.copyfile(EXAMPLE_DATA, unreadable)
    unreadable.chmod(0)
    status, answer = dashboard.call("/api/jobs", {"task": "finetune", **SMALL_RUN, "data": "secret.jsonl"})
    assert (status, answer["field"]) == (400, "data"), answer
    assert "cannot be read" in answer["error"]
    assert dashboard.call("/api/jobs")[1] == []


def test_a_valid_submission_is_recorded_queued_with_its_plan(dashboard: Dashboard) -> None:
    spec = {"task": "finetune", **SMALL_RUN, "data": "train.jsonl", "max-steps": 1000, "output": "out/api",
            "priority": 3}
    status, queued = dashboard.call("/api/jobs", spec)
    assert status == 200, queued
    job_id = queued["id"]
    try:
        job = dashboard.record(job_id)
        assert job.plan == queued["plan"] and queued["plan"]["method"] == "lora"
        assert queued["plan"]["micro_batch"] == 2 and queued["plan"]["seq_len"] == 64
        config = job.request["config"]
        assert config["data"]["path"] == str(dashboard.root / "train.jsonl")
        assert config["output_dir"] == str(dashboard.root / "out" / "api") and config["max_steps"] == 1000
        assert job.priority == 3
        events = dashboard.record(job_id, get_job_details).events
        assert events[0].to_status == JobStatus.QUEUED.value
    finally:
        dashboard.call(f"/api/jobs/{job_id}/cancel", {})  # the run is not this test's subject: free the cluster
    assert dashboard.wait_until_ended(job_id, timeout=120).status is JobStatus.CANCELLED


# ---- the page, in a browser -------------------------------------------------------------------------------
def missing(what: str) -> NoReturn:
    message = f"the browser test needs {what} (apt-get install -y chromium chromium-driver; pip install selenium)"
    unavailable(message, f"CI is set: {message}")


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless chromium driven through chromedriver, both Debian's (never a download)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing("selenium")
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        missing("chromium and chromedriver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,2000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    try:
        yield driver
    finally:
        driver.quit()


def artifacts_dir() -> Path:
    folder = Path(os.environ.get("LLMPLAN_ARTIFACTS") or REPO / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_a_job_submitted_from_a_plan_candidate_runs_and_shows_its_loss_curve(dashboard: Dashboard, browser) -> None:
    page = Page(browser)
    browser.get(dashboard.url + "/")
    try:
        page.set_value(page.element('#plan-form [name="model"]'), "x" * 300)  # a long error wraps
        page.element("#plan-form button[type=submit]").click()
        page.wait(lambda: "unknown model" in page.text("#plan-error"))
        assert page.fits_the_window()

        page.plan(model="7B", gpu="A100-80GB")
        rows = page.candidate_rows()
        assert rows and all(row.find_elements(page.by.CSS_SELECTOR, ".bar span") for row in rows)
        assert "Llama-2-7B" in page.text("#plan-result")
        terms = {span.get_attribute("data-term") for span in page.elements("#candidates .bar span")}
        legend = {entry.get_attribute("data-term") for entry in page.elements("#memory-legend [data-term]")}
        assert terms and terms == legend  # every colour of the bars is named once
        assert page.fits_the_window()

        page.plan(model="smollm2-135m-instruct", gpu="")
        first = page.candidate_rows()[0]
        micro_batch = first.find_elements(page.by.TAG_NAME, "td")[5].text.split(" x ")[0]
        first.find_element(page.by.CSS_SELECTOR, "button.submit-candidate").click()
        page.wait(lambda: page.element("#submit").is_displayed())
        assert page.field("model").get_attribute("value") == "SmolLM2-135M-Instruct"
        assert page.field("micro-batch").get_attribute("value") == micro_batch
        assert page.field("method").tag_name == "select" and page.field("precision").tag_name == "select"
        assert page.field("method").get_attribute("value") == first.find_elements(page.by.TAG_NAME, "td")[1].text

        page.fill({"data": "/etc/hostname"})
        page.element("#submit-form button[type=submit]").click()
        page.wait(lambda: "outside the folders" in page.text('.field-error[data-field="data"]'))

        page.fill({**SMALL_RUN, "model": str(dashboard.root / TINY_MODEL), "data": "train.jsonl", "max-steps": "4",
                   "output": "out/browser"})
        page.element("#data-preview-button").click()  # the data set as the job will read it
        records = len(EXAMPLE_DATA.read_text().splitlines())
        page.wait(lambda: f"alpaca format, {records} records" in page.text("#data-summary"))
        first_row = json.loads(EXAMPLE_DATA.read_text().splitlines()[0])["instruction"]
        assert first_row in page.text("#data-rows tr") and "median" in page.text("#data-summary")
        assert page.fits_the_window()
        page.element("#submit-form button[type=submit]").click()
        page.wait(lambda: page.element("#job").is_displayed() and page.text("#job-status-text"))
        job_id = int(re.search(r"Job (\d+)", page.text("#job h2")).group(1))
        page.wait(lambda: page.text("#job-status-text") in ("succeeded", "failed", "cancelled"), timeout=420)
        assert page.text("#job-status-text") == "succeeded", page.text("#job")
        page.wait(lambda: page.elements("#loss-curve path"))
        losses = [m for m in dashboard.record(job_id, get_job_details).metrics if m.loss is not None]
        drawn = page.element("#loss-curve path").get_attribute("d")
        assert len(losses) >= 4 and drawn.count("L") == len(losses) - 1
        summary = page.text("#loss-summary")  # the first and the last logged loss
        assert summary.startswith(f"step {losses[0].step}: ") and f"step {losses[-1].step}: " in summary, summary
        assert dashboard.record(job_id).output_dir == str(dashboard.root / "out" / "browser")
        labels = [cell.text for cell in page.elements("#job-detail td.label")]
        assert labels and not any("_" in text or "bytes" in text for text in labels), labels
        assert "peak memory per GPU" in labels and "tokens per second" in labels, labels
        times = [cell.text for cell in page.elements("#job-detail td.time") + page.elements("#job-rows td.time")]
        assert times and all(HUMAN_TIME.fullmatch(text) for text in times), times
        assert page.fits_the_window()

        page.set_value(page.element("#merge-output"), "merged")  # the finished job's adapter, merged
        page.element("#merge").click()
        page.wait(lambda: "merged into" in page.text("#merge-result"), timeout=300)
        assert (dashboard.root / "merged" / "config.json").is_file() and not (dashboard.root / "merged" /
                                                                              "adapter_config.json").exists()

        page.element("#chat-with-job").click()  # a turn with the job's adapter, through Ray's warm replica
        page.set_value(page.element('#chat-form [name="max_new_tokens"]'), "12")
        page.set_value(page.element('#chat-form [name="message"]'), "Could you tell me the secret code word?")
        page.element("#chat-form button[type=submit]").click()
        page.wait(lambda: page.elements("#chat-log .chat-assistant[data-job]") or page.text("#chat-error"), timeout=300)
        assert not page.text("#chat-error"), page.text("#chat-error")
        turn = dashboard.record(int(page.element("#chat-log .chat-assistant").get_attribute("data-job")))
        assert turn.status is JobStatus.SUCCEEDED and turn.name.startswith("chat ")
        assert turn.request["adapter"] == dashboard.record(job_id).adapter_path
        assert turn.request["settings"]["max_new_tokens"] == 12
        recorded = json.loads((Path(turn.output_dir) / "completions.jsonl").read_text())["completion"].strip()
        shown = page.text("#chat-log .chat-assistant .text")
        assert shown == (recorded or "(an empty answer: the model stopped at once)"), (shown, recorded)
        assert page.fits_the_window()
    finally:
        browser.save_screenshot(str(artifacts_dir() / "dashboard.png"))


class Page:
    """The dashboard page in the browser, by its element ids and the form fields' names."""

    def __init__(self, driver: Any) -> None:
        from selenium.webdriver.common.by import By

        self.driver, self.by = driver, By

    def element(self, css: str) -> Any:
        return self.driver.find_element(self.by.CSS_SELECTOR, css)

    def elements(self, css: str) -> list[Any]:
        return self.driver.find_elements(self.by.CSS_SELECTOR, css)

    def text(self, css: str) -> str:
        found = self.elements(css)
        return found[0].text if found else ""

    def field(self, name: str) -> Any:
        return self.element(f'#submit-form [name="{name}"]')

    def wait(self, condition: Callable[[], Any], timeout: float = 60) -> None:
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(self.driver, timeout, poll_frequency=0.5).until(lambda _: condition())

    def plan(self, *, model: str, gpu: str) -> None:
        previous = self.elements("#candidates")
        self.set_value(self.element('#plan-form [name="model"]'), model)
        self.set_value(self.element('#plan-form [name="gpu"]'), gpu)
        self.element("#plan-form button[type=submit]").click()
        self.wait(lambda: self.elements("#candidates") and self.elements("#candidates") != previous)

    def candidate_rows(self) -> list[Any]:
        return self.elements("#candidates tbody tr")

    def fill(self, values: dict[str, str]) -> None:
        for name, value in values.items():
            self.set_value(self.field(name), value)

    def fits_the_window(self) -> bool:
        """Whether the page fits the window's width (nothing makes it scroll sideways)."""
        return self.driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")

    def set_value(self, element: Any, value: str) -> None:
        if element.tag_name == "select":
            from selenium.webdriver.support.ui import Select

            Select(element).select_by_value(value)
            return
        element.clear()
        if value:
            element.send_keys(value)
