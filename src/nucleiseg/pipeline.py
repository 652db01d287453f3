"""Overlapping the stages of a batch: reading ahead, and a pool of workers for the CPU stages.

:func:`nucleiseg.predict_files` runs three stages per image: reading (and
decoding) the file, the network, then post-processing, measurements and
writing. Run one after the other, the network waits on the CPU stages and
they on it. Here:

- :func:`read_ahead` reads the next images in a thread while the network
  runs (decoding releases the GIL);
- :func:`worker_pool` gives the pool that finishes images while the network
  runs on the next ones, at a lower priority than the network: processes
  when the machine has cores to spare and the batch is long enough to repay
  starting them (the measurements and writers hold the GIL), else threads.

Worker processes are started with ``spawn``: they share no lock, file or
thread with the caller (the output folder's lock stays with the run), import
no PyTorch, and die with the process that started them. They ignore Ctrl-C
(SIGINT, which a terminal sends to every process of the command): the process
that started them handles it, and a pool shut down while its
``KeyboardInterrupt`` unwinds terminates its workers instead of waiting for
their tasks, so an interrupted run ends at once with its one line, without a
traceback from each worker. Torch-free; imports no NumPy itself.

Examples
--------
>>> with worker_pool(2, processes=False) as pool:
...     pool.submit(sum, [1, 2, 3]).result()
6
>>> [(item, got) for item, got in read_ahead(str.upper, ["a", "b"])]
[('a', 'A'), ('b', 'B')]
"""

from __future__ import annotations

import contextlib
import multiprocessing.context
import os
import queue
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["PROCESS_MIN_IMAGES", "Background", "Failed", "default_workers", "read_ahead", "use_processes",
           "worker_pool"]

T = TypeVar("T")
R = TypeVar("R")

#: A batch of at least this many images to predict is finished by worker processes, a shorter one by threads.
#: Threads share the GIL with the network's thread, which needs it between every two operators: worker threads
#: running Python code (the measurements, the writers) slowed the network down (fast mode, 32 images of 256x256 on
#: 2 cores: 1.01 images/s with 2 threads against 1.56 one image at a time, at load 6). Starting a process (spawn,
#: then NumPy, SciPy, scikit-image, pandas) takes about 1 s of one core; the CPU stages of a 256x256 image take
#: about 0.1 s.
PROCESS_MIN_IMAGES = 16

#: Niceness added to the workers: the network is the stage the others wait on, so on a busy CPU it comes first
#: and the workers take the cycles it leaves.
WORKER_NICENESS = 5

#: Images read ahead of the network.
READ_AHEAD = 2


def default_workers() -> int:
    """Workers for the CPU stages: one per core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


class Failed:
    """What :func:`read_ahead` yields for an item whose reading raised: the exception, to report later."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException):
        self.error = error


class Background:
    """``fn(*args)`` in a thread of its own, started now; :meth:`result` joins it and raises its error.

    A new thread per call (about 0.1 ms), not a pool: a process forked later inherits no pool whose
    thread it lacks.

    Examples
    --------
    >>> done = []
    >>> task = Background(done.append, "written in the background")
    >>> task.result(); done
    ['written in the background']
    """

    def __init__(self, fn: Callable[..., Any], *args: Any):
        self.error: BaseException | None = None

        def run() -> None:
            try:
                fn(*args)
            except BaseException as exc:  # handed to the caller by result()
                self.error = exc

        self.thread = threading.Thread(target=run, name="nucleiseg-background", daemon=True)
        self.thread.start()

    def result(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error


def read_ahead(read: Callable[[T], R], items: Iterable[T], depth: int = READ_AHEAD) -> Iterator[tuple[T, R | Failed]]:
    """``(item, read(item))`` in order, read in a thread up to ``depth`` items ahead of the consumer.

    An exception of ``read`` is yielded as :class:`Failed` (the other items go on). Leaving the loop
    early stops the thread after the item it is reading.
    """
    slots: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    end = object()

    def offer(entry: Any) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                try:
                    got: Any = read(item)
                except Exception as exc:  # reported by the consumer, per item
                    got = Failed(exc)
                if not offer((item, got)):
                    return
        finally:
            offer(end)

    thread = threading.Thread(target=produce, name="nucleiseg-read-ahead", daemon=True)
    thread.start()
    try:
        while (entry := slots.get()) is not end:
            yield entry
    finally:
        stop.set()
        thread.join()


def _main_is_importable() -> bool:
    """Whether a spawned process can import ``__main__`` without running the caller's work again.

    True for the ``nucleiseg`` command, ``python -m``, ``python -c`` and interactive sessions, and for a
    script that guards its work with ``if __name__ == "__main__"``.
    """
    main = sys.modules.get("__main__")
    if main is None or getattr(main, "__spec__", None) is not None:
        return True
    path = getattr(main, "__file__", None)
    if path is None:
        return True
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            source = f.read()
    except OSError:
        return False
    return "__main__" in source


def use_processes(workers: int, images: int) -> bool:
    """Whether ``images`` images are finished by ``workers`` processes (else threads); see :data:`PROCESS_MIN_IMAGES`.

    Examples
    --------
    >>> use_processes(2, 100), use_processes(2, 3), use_processes(1, 100)
    (True, False, True)
    """
    return images >= PROCESS_MIN_IMAGES and _main_is_importable()


def _lower_priority() -> None:
    """Add :data:`WORKER_NICENESS` to this thread (Linux: a thread's own niceness) or process."""
    try:
        who = threading.get_native_id() if sys.platform.startswith("linux") else 0
        os.setpriority(os.PRIO_PROCESS, who, min(19, os.getpriority(os.PRIO_PROCESS, who) + WORKER_NICENESS))
    except (AttributeError, OSError):  # Windows; or not permitted
        pass


def _die_with_parent(parent: int) -> None:
    """Worker initialiser: a lower priority; end this process when the process that started it ends (even SIGKILLed)."""
    _lower_priority()
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")  # each worker is one of the cores; NumPy is imported after this
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            libc = ctypes.CDLL(None, use_errno=True)
            PR_SET_PDEATHSIG = 1
            if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) == 0:
                if os.getppid() != parent:  # the parent died before the call
                    os._exit(1)
                return
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        import time

        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="nucleiseg-watch-parent", daemon=True).start()


@contextlib.contextmanager
def _interrupts_held() -> Iterator[None]:
    """SIGINT blocked in this thread meanwhile (POSIX): a process started meanwhile inherits the block,
    so it cannot be interrupted before :func:`_ignore_interrupts` runs in it. One that arrives for this
    process meanwhile is delivered to another thread or, when the block ends, to this one: never lost."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows
        yield
        return
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _ignore_interrupts() -> None:
    """Worker: ignore SIGINT (Ctrl-C is the parent's to handle: it terminates the workers), then unblock it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


class _SpawnProcess(multiprocessing.context.SpawnProcess):
    """A spawned worker process started with SIGINT blocked (:func:`_interrupts_held`): a Ctrl-C while
    it starts up (Python, the imports its task's module needs) is not a traceback of its own."""

    def start(self) -> None:
        with _interrupts_held():
            super().start()


class _SpawnContext(multiprocessing.context.SpawnContext):
    """The ``spawn`` start method, its processes :class:`_SpawnProcess`."""

    Process = _SpawnProcess


class _WorkerProcesses(ProcessPoolExecutor):
    """A process pool whose workers ignore SIGINT, and are terminated when the pool is shut down while a
    ``KeyboardInterrupt`` unwinds (``finally: pool.shutdown()``, or leaving a ``with`` block): the run
    stops now rather than when the workers' tasks (an image each) are done."""

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if isinstance(sys.exc_info()[1], KeyboardInterrupt):
            self._stop_workers()
            cancel_futures = True
        super().shutdown(wait=wait, cancel_futures=cancel_futures)

    def __exit__(self, exc_type, exc_val, exc_tb):
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self._stop_workers()
            self.shutdown(wait=True, cancel_futures=True)
            return False
        return super().__exit__(exc_type, exc_val, exc_tb)

    def _stop_workers(self) -> None:
        """Terminate the worker processes (SIGTERM): what they were doing is lost, as a Ctrl-C loses it."""
        for process in list((getattr(self, "_processes", None) or {}).values()):
            with contextlib.suppress(Exception):
                if process.is_alive():
                    process.terminate()


def _start_worker(parent: int, init: Callable[..., None] | None, initargs: tuple) -> None:
    """Worker initialiser: :func:`_ignore_interrupts`, :func:`_die_with_parent`, then the caller's own
    ``init(*initargs)``."""
    _ignore_interrupts()
    _die_with_parent(parent)
    if init is not None:
        init(*initargs)


def worker_pool(workers: int, processes: bool, init: Callable[..., None] | None = None,
                initargs: tuple = ()) -> Executor:
    """An executor of ``workers`` processes (spawned, see the module's notes) or threads.

    ``init(*initargs)`` runs once in each worker process as it starts (after it has lowered its
    priority, tied its life to this process and set Ctrl-C aside for this process to handle):
    loading a model, for example. A process pool shut down while a ``KeyboardInterrupt`` unwinds
    terminates its workers (see the module's notes).
    """
    if not processes:
        return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nucleiseg-worker",
                                  initializer=_lower_priority)
    return _WorkerProcesses(max_workers=workers, mp_context=_SpawnContext(),
                            initializer=_start_worker, initargs=(os.getpid(), init, initargs))
