"""The dashboard in a real browser (Debian's chromium via Playwright) against real processes:
`lorafleet serve`, a `lorafleet worker` on the tiny model, a redis-server; and Flower on the
same broker listing lorafleet's workers and tasks. Screenshots go to test-output/screenshots.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import urllib.request

import pytest

from tests.conftest import TINY, copy_home
from tests.helpers import BIN, REPO, RedisProcess, WorkerProcess, free_port, lorafleet_env, wait_until

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = REPO / "test-output" / "screenshots"
TOKEN = "e2e-token"
FLOWER_LOGIN = "ops:flower-e2e"


def _get(url: str, token: str | None = None, basic: str | None = None):
    if basic:
        headers = {"Authorization": "Basic " + base64.b64encode(basic.encode()).decode()}
    else:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def fleet(template_home, tmp_path_factory):
    root = tmp_path_factory.mktemp("dashboard")
    redis = RedisProcess(root / "redis").start()
    home = copy_home(template_home, root / "home")
    env = lorafleet_env(home, redis.url, str(root / "outputs"), LORAFLEET_API_TOKENS=TOKEN)
    port = free_port()
    flower_port = free_port()
    flower = subprocess.Popen(
        [
            str(BIN / "celery"),
            f"--broker={redis.url}",
            "flower",
            f"--port={flower_port}",
            "--address=127.0.0.1",
            f"--basic-auth={FLOWER_LOGIN}",
        ],
        env=env,
        stdout=open(root / "flower.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    serve = subprocess.Popen(
        [str(BIN / "lorafleet"), "serve", "--port", str(port)],
        env=env,
        stdout=open(root / "serve.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return _get(f"{base}/healthz")["ok"]
        except OSError:
            return False

    wait_until(up, timeout=60, what="lorafleet serve")
    worker = WorkerProcess(env, TINY, root / "worker.log", name="dash-worker@e2e").start()
    yield {
        "base": base,
        "env": env,
        "redis": redis,
        "root": root,
        "flower": f"http://127.0.0.1:{flower_port}",
    }
    worker.stop()
    for process in (serve, flower):
        process.terminate()
        process.wait(20)
    redis.stop()


def _browser():
    from playwright.sync_api import sync_playwright

    playwright = sync_playwright().start()
    browser = playwright.chromium.launch(
        executable_path=CHROMIUM,
        args=[
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ],
    )
    return playwright, browser


def test_dashboard_follows_jobs_live_and_acts_on_them(fleet):
    SHOTS.mkdir(parents=True, exist_ok=True)
    playwright, browser = _browser()
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(fleet["base"] + "/")
        page.wait_for_url("**/login?next=/")
        page.fill("input[name=token]", TOKEN)
        page.click("button[type=submit]")
        page.wait_for_selector("#workers [data-worker='dash-worker@e2e']")
        submit = """async body => {
            const r = await fetch('/v1/jobs', {method: 'POST', headers: {'content-type': 'application/json'},
                                               body: JSON.stringify(body)});
            return [r.status, await r.json()];
        }"""
        long_job = {
            "model": TINY,
            "prompt": "a long lighthouse",
            "steps": 40,
            "width": 256,
            "height": 256,
            "num_images": 3,
            "seed": 1,
        }
        status, made = page.evaluate(
            submit,
            [long_job]
            + [
                {
                    "model": TINY,
                    "prompt": f"a castle {i}",
                    "sampler": "lcm",
                    "seed": 10 + i,
                    "loras": [
                        {"name": "watercolor", "weight": 0.8},
                        {"name": "lcm-lora-sd15", "weight": 0.35},
                    ],
                }
                for i in range(3)
            ]
            + [{"model": TINY, "prompt": "to be cancelled", "seed": 99}],
        )
        assert status == 201, made
        ids = [j["job_id"] for j in made["jobs"]]
        long_id, doomed = ids[0], ids[-1]
        row = lambda job_id: f"#jobs tr[data-job='{job_id}']"  # noqa: E731
        page.wait_for_selector(f"{row(long_id)}[data-status='running'] .bar")
        page.wait_for_selector(f"{row(ids[1])}[data-status='queued']")
        page.screenshot(path=str(SHOTS / "overview-running.png"), full_page=True)
        assert page.locator("#queues tr[data-model='tiny-sd15'] .depth").inner_text().startswith(("4", "3"))
        page.click(f"{row(doomed)} button.cancel")
        page.wait_for_selector(f"{row(doomed)}[data-status='cancelled']")
        for job_id in ids[:-1]:
            page.wait_for_selector(f"{row(job_id)}[data-status='succeeded']", timeout=120_000)
        thumb = page.locator(f"{row(ids[1])} img.thumb")
        thumb.wait_for()
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=thumb.element_handle())
        assert page.locator("[data-count='cancelled'] b").inner_text() == "1"
        page.screenshot(path=str(SHOTS / "overview-done.png"), full_page=True)

        page.click(f"{row(ids[1])} td a >> nth=0")
        page.wait_for_url(f"**/jobs/{ids[1]}")
        page.wait_for_selector("#images figure img")
        page.wait_for_function("() => document.querySelector('#images img').naturalWidth > 0")
        assert page.locator("#status").inner_text() == "succeeded"
        cli = page.locator("#cli").inner_text()
        assert cli.startswith("lorafleet submit --model tiny-sd15") and "--lora watercolor:0.8" in cli
        assert "watercolor:0.8 + lcm-lora-sd15:0.35" in page.locator("#parameters").inner_text()
        page.screenshot(path=str(SHOTS / "job.png"), full_page=True)

        page.goto(fleet["base"] + f"/jobs/{doomed}")
        page.wait_for_selector("button.retry")
        page.click("button.retry")
        page.wait_for_url(lambda url: doomed not in url and "/jobs/" in url)
        page.wait_for_selector("#status[data-status='succeeded']", timeout=60_000)

        page.goto(fleet["base"] + f"/batches/{made['batch_id']}")
        page.wait_for_function("() => document.querySelectorAll('#sheet img').length >= 6")
        page.screenshot(path=str(SHOTS / "batch.png"), full_page=True)

        # a sweep: its page lays the jobs out by axes, follows them live, and shows the grid
        sweep = """async body => {
            const r = await fetch('/v1/sweeps', {method: 'POST', headers: {'content-type': 'application/json'},
                                                 body: JSON.stringify(body)});
            return [r.status, await r.json()];
        }"""
        status, swept = page.evaluate(
            sweep,
            {
                "base": {"model": TINY, "prompt": "a lighthouse", "seed": 5, "steps": 2},
                "x": {"name": "lora:watercolor", "values": [0.3, 0.9]},
                "y": {"name": "seed", "count": 2},
            },
        )
        assert status == 201, swept
        page.goto(fleet["base"] + f"/batches/{swept['batch_id']}")
        page.wait_for_selector("#axes table.axes th:has-text('0.9')")
        assert page.locator("#axes table.axes tbody tr").count() == 2  # one row per seed
        page.wait_for_selector("#grids img.grid", timeout=120_000)  # drawn when the last job ends
        page.wait_for_function("() => document.querySelector('#grids img.grid').naturalWidth > 0")
        assert page.locator("#axes td[data-status='succeeded']").count() == 4
        page.screenshot(path=str(SHOTS / "sweep.png"), full_page=True)
    finally:
        browser.close()
        playwright.stop()


def test_flower_on_the_same_broker_lists_the_worker_and_its_tasks(fleet):
    def tasks():
        try:
            return _get(fleet["flower"] + "/api/tasks", basic=FLOWER_LOGIN)
        except OSError:
            return None

    wait_until(lambda: tasks() is not None, timeout=60, what="flower")
    env = fleet["env"]
    out = subprocess.run(
        [str(BIN / "lorafleet"), "submit", "--model", TINY, "--prompt", "for flower", "--wait", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    job_id = json.loads(out.stdout)[0]["job_id"]
    found = wait_until(lambda: (tasks() or {}).get(job_id), timeout=30, what="the task in flower")
    assert found["name"] == "lorafleet.generate" and found["state"] == "SUCCESS"
    assert found["worker"] == "dash-worker@e2e"
    workers = wait_until(
        lambda: _get(fleet["flower"] + "/api/workers?refresh=1", basic=FLOWER_LOGIN) or None,
        timeout=30,
        what="workers",
    )
    assert "dash-worker@e2e" in workers
