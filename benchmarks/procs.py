"""Starting and talking to benchmark child processes (see worker.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

from benchmarks.common import REPO

TIMEOUT = 300.0  # hang guard for one child's step


class Child:
    def __init__(self, proc: asyncio.subprocess.Process, role: str) -> None:
        self.proc = proc
        self.role = role

    async def line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), TIMEOUT)
        if not raw:
            err = b""
            if self.proc.stderr is not None:
                with contextlib.suppress(TimeoutError):
                    err = await asyncio.wait_for(self.proc.stderr.read(), 5)
            tail = err.decode(errors="replace")[-3000:]
            raise RuntimeError(f"benchmark worker {self.role} exited early:\n{tail}")
        message: dict[str, Any] = json.loads(raw)
        if "error" in message:
            raise RuntimeError(f"benchmark worker failed: {message['error']}")
        return message

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")

    async def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        await self.proc.wait()


async def spawn(role: str, **cfg: Any) -> Child:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks.worker",
        role,
        json.dumps(cfg),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=str(REPO),
        env=env,
    )
    return Child(proc, role)


@contextlib.asynccontextmanager
async def children(role: str, configs: list[dict[str, Any]]) -> AsyncIterator[list[Child]]:
    """Start one child per config and wait until all are ready; kill them at the end."""
    started: list[Child] = []
    try:
        for cfg in configs:
            started.append(await spawn(role, **cfg))
        for child in started:
            ready = await child.line()
            assert ready.get("ready"), ready
        yield started
    finally:
        for child in started:
            await child.kill()
