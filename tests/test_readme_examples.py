"""The README's examples are tests: every fenced block is run against a real worker, or is
marked as not runnable right before it (`<!-- not-a-test: why -->`), or this fails.

- ```toml with `[plugins.*]` tables: written beside a copy of examples/pluginpool_examples
  (so a `source` resolves as the README says), registered, and every operation of every
  plugin in it is executed on the module's worker.
- ```python whose first line names a file of the repository (`# examples/...py`): the
  block must be that file's code, verbatim (the manifests above run it).
- other ```python: executed in order in one namespace, like a session, with PLUGINPOOL_*
  pointing at the test database (and `celery_app`, a plain Celery app on the same broker).
- ```sh / ```console: every line is a `pluginpool` command, run with the CLI; exit 0.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from pluginpool.tasks.client import PluginClient
from pluginpool.tasks.settings import Settings
from tests.conftest import EXAMPLES, ROOT, make_settings, retire, spawn_worker, worker_env

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "deploy").rglob("*.md"))]
MARKER = re.compile(r"<!--\s*not-a-test:\s*(?P<why>.+?)\s*-->")
FENCE = re.compile(r"^```(?P<lang>[\w-]*)\s*$")
SHELL = {"sh", "console", "bash", "shell"}
SAMPLE = {"text": "The cat sat on the mat. The cat ran. A dog barked!"}


@dataclass(frozen=True)
class Block:
    """One fenced code block: where it is, its language, its text, its marker if any."""

    document: Path
    line: int
    lang: str
    text: str
    not_a_test: str | None

    @property
    def where(self) -> str:
        return f"{self.document.relative_to(ROOT)}:{self.line}"

    @property
    def source_file(self) -> Path | None:
        """The repository file a ```python block says it shows (`# path` first line)."""
        first = self.text.split("\n", 1)[0]
        if self.lang == "python" and first.startswith("# "):
            path = ROOT / first[2:].strip()
            if path.is_file():
                return path
        return None

    def kind(self) -> str | None:
        """How this block is run, or None when it is neither runnable nor marked."""
        if self.not_a_test:
            return "marked"
        if self.lang == "toml":
            return "toml" if isinstance(tomllib.loads(self.text).get("plugins"), dict) else None
        if self.lang == "python":
            return "python-file" if self.source_file else "python"
        if self.lang in SHELL:
            commands = shell_commands(self.text)
            if commands and all(argv[0] == "pluginpool" and not synopsis(argv)
                                for argv in commands):
                return "sh"
        return None


def shell_commands(text: str) -> list[list[str]]:
    return [argv for line in text.splitlines() if (argv := shlex.split(line, comments=True))]


def synopsis(argv: list[str]) -> bool:
    """A usage line (`[--json]`, `ID`, `...`) rather than a command to run."""
    return any(arg.startswith("[") or arg.endswith("]") or "..." in arg or arg.isupper()
               for arg in argv)


def blocks(document: Path) -> list[Block]:
    found: list[Block] = []
    lines = document.read_text().splitlines()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
        marker = MARKER.search(lines[index - 1]) if index else None
        found.append(Block(document, index + 1, opening["lang"],
                           "\n".join(lines[index + 1:end]) + "\n",
                           marker["why"] if marker else None))
        index = end + 1
    return found


ALL_BLOCKS = [block for document in DOCUMENTS for block in blocks(document)]


def test_every_block_is_run_or_marked() -> None:
    """A new example nobody runs fails here: make it runnable, or mark it (and say why)."""
    uncovered = [f"{block.where} ```{block.lang}" for block in ALL_BLOCKS
                 if block.kind() is None]
    assert not uncovered, ("examples neither run nor marked `<!-- not-a-test: why -->`: "
                           f"{uncovered}")


@dataclass
class Session:
    """What the README's examples run against: one worker, one key prefix, one workdir."""

    settings: Settings
    client: PluginClient
    workdir: Path


@pytest.fixture(scope="module")
def session(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    settings = make_settings(redis_url, key_prefix=f"ppreadme:{uuid.uuid4().hex[:8]}:")
    workdir = tmp_path_factory.mktemp("readme")
    shutil.copytree(EXAMPLES / "pluginpool_examples", workdir / "pluginpool_examples",
                    ignore=shutil.ignore_patterns("__pycache__"))
    with PluginClient(settings) as client:
        worker = spawn_worker(client, tmp_path_factory.mktemp("readme-worker"),
                              concurrency=2)
        try:
            yield Session(settings, client, workdir)
        finally:
            retire(worker)


def run_manifest(block: Block, session: Session) -> None:
    """Register the block's manifest, then run every operation of every plugin in it."""
    path = session.workdir / f"readme-{block.line}.toml"
    path.write_text(block.text)
    tables = tomllib.loads(block.text)["plugins"]
    for spec in session.client.register(path):
        if "source" in tables[spec.id]:
            assert spec.artifact is not None, f"{block.where}: {spec.id} has no artifact"
        instance = session.client.load(spec.id)
        for operation in spec.operations:
            value = session.client.execute(instance, SAMPLE, operation=operation, timeout=60)
            assert value, f"{block.where}: {spec.id}.{operation} returned {value!r}"
        session.client.unload(instance)


def run_commands(block: Block, session: Session) -> None:
    for argv in shell_commands(block.text):
        done = subprocess.run([sys.executable, "-m", "pluginpool.pool.tools.cli", *argv[1:]],
                              env=worker_env(session.settings), cwd=ROOT, timeout=120,
                              capture_output=True, text=True, check=False)
        assert done.returncode == 0, f"{block.where}: {argv}: {done.stdout}{done.stderr}"


def test_readme_examples_run(session: Session, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    """Every runnable block, in document order (the Python examples use the plugins the
    manifests above them registered); reports how many of each kind ran."""
    monkeypatch.chdir(ROOT)
    for name, value in worker_env(session.settings).items():
        if name.startswith("PLUGINPOOL_"):
            monkeypatch.setenv(name, value)
    url = session.settings.redis_url
    celery_app = Celery("readme-producer", broker=url, backend=url, set_as_current=False)
    namespace: dict[str, Any] = {"__name__": "__readme__", "celery_app": celery_app}
    ran: Counter[str] = Counter()
    try:
        for block in ALL_BLOCKS:
            kind = block.kind()
            if kind == "toml":
                run_manifest(block, session)
            elif kind == "python-file":
                assert block.source_file is not None
                code = block.text.split("\n", 1)[1].strip("\n")
                assert code in block.source_file.read_text(), (
                    f"{block.where} is not the code of {block.source_file.relative_to(ROOT)}")
            elif kind == "python":
                exec(compile(block.text, block.where, "exec"), namespace)
            elif kind == "sh":
                run_commands(block, session)
            ran[kind or "uncovered"] += 1
    finally:
        celery_app.close()
        for value in list(namespace.values()):
            if isinstance(value, PluginClient):
                value.close()
    with capsys.disabled():
        print(f"\nREADME examples: {sum(ran.values()) - ran['marked']} run "
              f"({dict(ran)}), of {len(ALL_BLOCKS)} blocks in "
              f"{', '.join(str(d.relative_to(ROOT)) for d in DOCUMENTS)}")
    assert ran["uncovered"] == 0
    assert ran["toml"] >= 3 and ran["python"] >= 4 and ran["sh"] >= 1, ran
