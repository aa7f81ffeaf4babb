"""The zygote's watch of its pool child (runtime/zygote.py's PoolChildWatch), in a process
of its own whose control socket (fd 3) has lost its other end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

WATCH_END = """
import os, socket, sys
from pluginpool.pool.sandbox.runtime import zygote
from pluginpool.pool.sandbox.runtime.context import ChannelStorage
home, calls = sys.argv[1], sys.argv[2]
a, b = socket.socketpair()
if a.fileno() != 3:
    os.dup2(a.fileno(), 3)
    a.close()
b.close()  # the pool child is gone


class Policy:
    enforcing = False
    violations: list = []


policy = Policy()
watch = zygote.PoolChildWatch(home, policy)
storage = ChannelStorage(3, policy, on_closed=watch.check)


class Plugin:
    def close(self):
        with open(calls, "a") as out:
            out.write("close\\n")
        storage.get("state")  # a teardown persisting its state: the channel is gone
        return True


watch.plugin = Plugin()
watch.start()  # the end is there already: the check after arming ends the zygote
sys.exit("the watch did not end the process")
"""


def test_a_zygote_whose_pool_child_is_gone_tears_down_once_and_empties_its_home(
        tmp_path: Path) -> None:
    """The watch of runtime/zygote.py, in a process of its own with a dead control socket
    on fd 3: the set-up plugin's close() runs once (its storage call, failing, must not
    start the teardown again: it did, until the stack overflowed and the home was left),
    then the home is emptied and the process exits 0."""
    home = tmp_path / "home"
    (home / "setup").mkdir(parents=True)
    (home / "setup" / "left.txt").write_text("x")
    calls = tmp_path / "calls"
    done = subprocess.run([sys.executable, "-c", WATCH_END, str(home), str(calls)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert calls.read_text() == "close\n"
    assert list(home.iterdir()) == []
