"""The loop's preemption handling: a stop is saved; a hung process can still
be stopped without SIGKILL (second signal, or no progress after the first).

Each case runs in its own Python process, which signals itself.
"""
import signal
import subprocess
import sys
import time

from tests import helpers

_CHILD = """
import os, signal, sys, threading, time
from research.core import loop
hang, grace, signals = sys.argv[1] == "hang", float(sys.argv[2]), int(sys.argv[3])
with loop.Preemption(grace_s=grace) as preemption:
    assert not preemption.requested()
    for _ in range(signals):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
    if hang:
        # A hung step: the main thread never returns to the loop.
        threading.Event().wait(60)
        print("not ended", flush=True)
    else:
        time.sleep(0.2)
        print("requested", preemption.requested(), flush=True)
print("exited the loop", flush=True)
"""


def _run(mode, grace_s, signals):
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _CHILD, mode, str(grace_s),
                           str(signals)], cwd=helpers.REPO, capture_output=True,
                          text=True, timeout=120)
    return proc, time.monotonic() - start


def test_a_signal_asks_for_a_stop_at_the_next_chunk():
    proc, _ = _run("step", 60, 1)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["requested True", "exited the loop"]


def test_a_hung_step_ends_after_the_grace_period():
    proc, seconds = _run("hang", 2, 1)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "not ended" not in proc.stdout
    assert "no training steps completed for 2s" in proc.stderr
    assert "checkpoints already saved are kept" in proc.stderr
    assert seconds < 30


def test_a_second_signal_ends_a_hung_process_at_once():
    proc, seconds = _run("hang", 600, 2)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "a second one arrived" in proc.stderr
    assert seconds < 30
