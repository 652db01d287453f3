"""The pool of worker processes (nucleiseg.pipeline): Ctrl-C is the parent's to handle."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nucleiseg import pipeline

posix_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals, process groups")


@posix_only
def test_worker_processes_ignore_ctrl_c() -> None:
    pool = pipeline.worker_pool(1, True)
    try:
        assert pool.submit(signal.getsignal, signal.SIGINT).result(timeout=60) == signal.SIG_IGN
    finally:
        pool.shutdown()


@posix_only
def test_pool_shut_down_by_an_interrupt_ends_its_workers_at_once() -> None:
    """``finally: pool.shutdown()`` while a KeyboardInterrupt unwinds does not wait for the tasks in hand."""
    pool = pipeline.worker_pool(1, True)
    future = pool.submit(time.sleep, 30)
    deadline = time.monotonic() + 30
    while not future.running() and time.monotonic() < deadline:
        time.sleep(0.05)
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        try:
            raise KeyboardInterrupt
        finally:
            pool.shutdown(wait=True)
    assert time.monotonic() - start < 10
    # without an interrupt, shutdown waits for the tasks as before
    with pipeline.worker_pool(1, True) as pool:
        future = pool.submit(sum, [1, 2])
    assert future.result() == 3


_CTRL_C_WHILE_LOADING = """
    import os, sys, time
    from pathlib import Path

    from nucleiseg import pipeline

    def load(folder):  # a worker's initializer: loading a model, say
        (Path(folder) / f"worker-{os.getpid()}").touch()
        time.sleep(60)

    if __name__ == "__main__":
        try:
            pool = pipeline.worker_pool(2, True, load, (sys.argv[1],))
            try:
                futures = [pool.submit(abs, -k) for k in range(4)]
                print("submitted", flush=True)
                futures[0].result()
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
"""


@posix_only
@pytest.mark.parametrize("when", ["starting", "loading"])
def test_ctrl_c_while_workers_start_is_one_line(tmp_path: Path, when: str, outliving) -> None:
    """A terminal's Ctrl-C (SIGINT to the whole process group) while the workers start up or run their
    initializer: the parent's one line, no traceback from each worker, no worker left running."""
    script = tmp_path / "pool.py"
    script.write_text(textwrap.dedent(_CTRL_C_WHILE_LOADING))
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    workers: list[int] = []
    try:
        assert proc.stdout.readline() == "submitted\n"
        if when == "loading":
            deadline = time.monotonic() + 60
            while len(workers) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
                workers = [int(p.name.split("-")[1]) for p in tmp_path.glob("worker-*")]
            assert len(workers) == 2, "the workers did not start"
        else:
            time.sleep(0.05)  # the workers' Python is starting, importing
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=20)
        assert proc.returncode == 130
        assert stderr == "interrupted\n", stderr
        workers = [int(p.name.split("-")[1]) for p in tmp_path.glob("worker-*")]
        assert not outliving(workers)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # only the group this test started, should an assertion fail
        proc.wait()
