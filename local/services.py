"""Background processes of the local mode (the AWS emulation, the endpoint server), kept under one state folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


class ServiceFailed(RuntimeError):
    """A background process did not come up; the message ends with the tail of its log."""


class BackgroundService:
    """A process started with `--ready-file`, which it writes (JSON with at least "pid") once it serves."""

    def __init__(self, name: str, state_dir: Path) -> None:
        self.name = name
        self.ready_file = state_dir / f"{name}.json"
        self.log_file = state_dir / f"{name}.log"

    def info(self) -> dict | None:
        """The ready file's content if the process is alive, else None."""
        try:
            info = json.loads(self.ready_file.read_text())
            os.kill(info["pid"], 0)
            return info
        except (FileNotFoundError, json.JSONDecodeError, ProcessLookupError, KeyError):
            return None

    def start(self, arguments: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> dict:
        self.ready_file.unlink(missing_ok=True)
        with open(self.log_file, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, *arguments, "--ready-file", str(self.ready_file)],
                env={**os.environ, **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while (info := self.info()) is None:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                tail = self.log_file.read_text(errors="replace").splitlines()[-15:]
                raise ServiceFailed(f"{self.name} did not start; the end of {self.log_file}:\n" + "\n".join(tail))
            time.sleep(0.1)
        return info

    def stop(self, timeout: float = 10) -> bool:
        """Stop the process if it runs; True if one was stopped."""
        info = self.info()
        if info is None:
            self.ready_file.unlink(missing_ok=True)
            return False
        os.kill(info["pid"], signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(info["pid"]):
                break
            time.sleep(0.05)
        else:
            os.kill(info["pid"], signal.SIGKILL)
            deadline = time.monotonic() + 5
            while _alive(info["pid"]) and time.monotonic() < deadline:  # gone before its port or spool is reused
                time.sleep(0.05)
        self.ready_file.unlink(missing_ok=True)
        return True


def _alive(pid: int) -> bool:
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:  # our own child, which has exited: reap it
            return False
    except ChildProcessError:  # started by another process (an earlier `make run`)
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
