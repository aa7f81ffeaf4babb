"""The dashboard as the plugin manager, clicked in headless Chromium (DevTools protocol
over its websocket): sign in, open a plugin's page, disable it (submits are refused),
enable it, reset its breaker, read a failed run's logs; plugin text never becomes HTML.
Also /metrics: one fixed bucket set for every plugin."""

from __future__ import annotations

import base64
import json
import os
import shutil
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websocket
from prometheus_client.parser import text_string_to_metric_families

from pluginpool.policy.errors import PluginDisabledError, PluginExecutionError
from pluginpool.policy.health import LATENCY_BUCKETS_MS
from pluginpool.pool.tools.processes import ManagedProcess, wait_until
from pluginpool.pool.tools.redis_bootstrap import free_port
from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.manifest import load_manifest
from tests.conftest import TEST_PLUGINS, make_settings, retire, spawn_worker, worker_env
from tests.pool.test_aggregator import chromium

OPERATOR = "op-" + uuid.uuid4().hex
XSS = '<img src=x onerror="window.__xss=1">'
SCREENSHOTS = os.environ.get("PLUGINPOOL_SCREENSHOT_DIR")  # `make screenshots` sets docs/


class Browser:
    """One headless Chromium tab, driven with real mouse and keyboard events."""

    def __init__(self, tmp_path: Path) -> None:
        port = free_port()
        self.proc = ManagedProcess(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-sync",
             "--disable-component-update", "--window-size=1400,1700",
             f"--user-data-dir={tmp_path / 'chromium'}", f"--remote-debugging-port={port}",
             "about:blank"], log_path=tmp_path / "chromium.log")
        pages: list[dict[str, Any]] = []

        def page_listed() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list",
                                            timeout=2) as response:
                    pages[:] = [p for p in json.loads(response.read()) if p["type"] == "page"]
            except OSError:
                return False
            return bool(pages)

        assert wait_until(page_listed, timeout_s=30), self.proc.log_text()
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=30)
        self._id = 0

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self._id:
                assert "error" not in reply, reply
                return dict(reply.get("result", {}))

    def eval(self, expression: str) -> Any:
        out = self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                        awaitPromise=True)
        return out.get("result", {}).get("value")

    def wait(self, expression: str, timeout_s: float = 20) -> None:
        assert wait_until(lambda: bool(self.eval(expression)), timeout_s=timeout_s,
                          interval_s=0.1), expression

    def click(self, selector: str) -> None:
        self.wait(f"!!document.querySelector({json.dumps(selector)})")
        x, y = self.eval(f"""(() => {{
            const node = document.querySelector({json.dumps(selector)});
            node.scrollIntoView({{block: "center"}});
            const r = node.getBoundingClientRect();
            return [r.x + r.width / 2, r.y + r.height / 2]; }})()""")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left",
                      clickCount=1)

    def type(self, selector: str, text: str) -> None:
        self.click(selector)
        self.send("Input.insertText", text=text)

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot")["data"]))

    def close(self) -> None:
        self.ws.close()
        self.proc.stop()


@pytest.fixture(scope="module")
def env(redis_url: str, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[tuple[PluginClient, str]]:
    settings = make_settings(redis_url, key_prefix=f"ppdash:{uuid.uuid4().hex[:8]}:",
                             api_tokens={OPERATOR: "operator"}, worker_heartbeat_s=1.0)
    client = PluginClient(settings)
    # Ids of its own: queues (`plugins.<id>`) are not under the key prefix, so with the
    # manifest's ids this module's worker and test_operations' shared their queues.
    specs = {spec.id: spec for spec in load_manifest(TEST_PLUGINS / "ops_plugins.toml")}
    client.register([specs[source].model_copy(update={"id": own}) for source, own in
                     (("ops-talks", "dash-talks"), ("ops-echo", "dash-echo"),
                      ("idle-ops", "dash-idle"))])
    logs = tmp_path_factory.mktemp("dash")
    worker = spawn_worker(client, logs, plugins="dash-talks,dash-echo", concurrency=2)
    port = free_port()
    aggregator = ManagedProcess(
        [sys.executable, "-m", "pluginpool.pool.tools.cli", "aggregator", "--port", str(port)],
        env=worker_env(settings), log_path=logs / "aggregator.log")
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            with urllib.request.urlopen(base + "/livez", timeout=2) as response:
                return bool(json.loads(response.read())["events_connected"])
        except OSError:
            return False

    assert wait_until(up, timeout_s=30), aggregator.log_text()
    yield client, base
    retire(aggregator, worker)
    client.close()


def test_the_dashboard_manages_a_plugin_by_clicking(env: tuple[PluginClient, str],
                                                    tmp_path: Path) -> None:
    client, base = env
    for i in range(4):
        client.submit("dash-talks", {"tag": f"run {i}"}).result(timeout=30)
        client.submit("dash-echo", {"i": i}).result(timeout=30)
    failed = client.submit("dash-talks", {"tag": XSS, "fail": True})
    with pytest.raises(PluginExecutionError):
        failed.result(timeout=30)
    browser = Browser(tmp_path)
    try:
        browser.send("Page.navigate", url=base + "/")
        browser.wait("!document.getElementById('login').hidden")
        browser.type("#token", OPERATOR)
        browser.click("#login-btn")
        browser.wait("!!document.querySelector('tr[data-plugin=\"dash-talks\"]')")
        assert browser.eval("document.querySelector('th:nth-child(7)').textContent") \
            == "memory vs limit"
        shoot(browser, tmp_path, "dashboard-overview.png")

        browser.click('a[data-link="dash-talks"]')
        browser.wait("!!document.querySelector('[data-view=plugin][data-plugin=\"dash-talks\"]')")
        browser.click('button[data-action="disable"]')
        browser.wait("!document.getElementById('confirm').hidden")
        browser.click("#confirm-yes")
        browser.wait("!!document.querySelector('[data-pause=disabled]')")
        with pytest.raises(PluginDisabledError):
            client.submit("dash-talks", {"tag": "refused"})

        browser.click('button[data-action="enable"]')
        browser.click("#confirm-yes")
        browser.wait("!!document.querySelector('[data-pause=enabled]')")
        assert client.submit("dash-talks", {"tag": "back"}).result(timeout=30) == "said it"

        client.force_open_breaker("dash-talks")
        browser.wait("!!document.querySelector('[data-breaker=open]')")
        browser.click('button[data-action="reset-breaker"]')
        browser.click("#confirm-yes")
        browser.wait("!!document.querySelector('[data-breaker=closed]')")
        assert client.breaker("dash-talks").state == "closed"

        logs = f'[data-error="{failed.id}"] details[data-key="log:{failed.id}"]'
        browser.click(logs + " summary")
        browser.wait(f"document.querySelector('{logs}').open")
        text = browser.eval(f"document.querySelector('{logs} pre').textContent")
        assert f"stderr: to stderr {XSS}" in text and f"stdout: to stdout {XSS}" in text
        message = browser.eval(f"document.querySelector('[data-error=\"{failed.id}\"] "
                               ".message').textContent")
        assert XSS in message  # shown as the text it is
        time.sleep(0.5)  # an onerror handler, had an <img> been made, would have run
        assert browser.eval("document.querySelectorAll('#view img').length") == 0
        assert browser.eval("window.__xss === undefined")
        shoot(browser, tmp_path, "dashboard-plugin.png")
    finally:
        browser.close()
    actions = [e.action for e in client.audit_log(target="dash-talks")]
    assert actions[:4] == ["breaker-reset", "breaker-force-open", "enable", "disable"]


def shoot(browser: Browser, tmp_path: Path, name: str) -> None:
    browser.eval("window.scrollTo(0, 0)")
    browser.screenshot(tmp_path / name)
    if SCREENSHOTS:
        shutil.copy(tmp_path / name, Path(SCREENSHOTS) / name)


def test_metrics_histograms_have_one_fixed_bucket_set(env: tuple[PluginClient, str]) -> None:
    client, base = env
    client.submit("dash-echo", {}).result(timeout=30)
    with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
        text = response.read().decode()
    bounds: dict[str, list[str]] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "pluginpool_plugin_run_duration_ms":
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    bounds.setdefault(sample.labels["plugin"], []).append(sample.labels["le"])
    expected = [str(b) for b in LATENCY_BUCKETS_MS] + ["+Inf"]
    assert set(bounds) >= {"dash-echo", "dash-talks", "dash-idle"}
    assert all(found == expected for found in bounds.values()), bounds
