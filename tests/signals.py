"""Stopping a real child process with a real signal, timed (one-shot commands, cli.md)."""

from __future__ import annotations

import signal
import subprocess
import time


def stop_and_time(process: subprocess.Popen[str], signum: signal.Signals) -> tuple[str, float]:
    """Send `signum` and wait for the exit: (stderr, seconds it took). A process still running
    after 20 s is killed (the caller's exit-code assertion then fails)."""
    try:
        started = time.monotonic()
        process.send_signal(signum)
        _, err = process.communicate(timeout=20)
        return err, time.monotonic() - started
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
