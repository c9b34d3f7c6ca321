"""Process pools of the commands that train or tokenize in worker processes (`compare
--workers`, `prepare-data --workers`). Imports no torch: prepare-data's workers unpickle
their Process objects from here and should not pay for it.

The parent handles Ctrl-C and stops the pool; its workers ignore Ctrl-C from their first
instruction (the terminal sends it to the whole process group, and a worker interrupted
inside the pool's queues printed tracebacks, or left the parent's shutdown waiting for ever).
"""

from __future__ import annotations

import multiprocessing.context
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor


class _SpawnProcess(multiprocessing.context.SpawnProcess):
    """A spawned process that starts with SIGINT ignored: set in the parent around the start,
    the disposition is inherited, and Python keeps an inherited SIG_IGN (no KeyboardInterrupt
    ever). An initializer would come too late: the child imports the parent's main module
    first, and a Ctrl-C then printed a traceback from the import."""

    def start(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return super().start()  # signal.signal works in the main thread only
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            super().start()
        finally:
            signal.signal(signal.SIGINT, previous)


class _SpawnContext(multiprocessing.context.SpawnContext):
    """The spawn context of one pool; it keeps the processes it made, so that stop_pool ends
    those and no other child of the parent (a notebook's own processes, another pool)."""

    def __init__(self):
        super().__init__()
        self.started: list[_SpawnProcess] = []

    def Process(self, *args, **kwargs) -> _SpawnProcess:  # noqa: N802 (the context's API)
        process = _SpawnProcess(*args, **kwargs)
        self.started.append(process)
        return process


class _Pool(ProcessPoolExecutor):
    def __init__(self, workers: int, initializer, initargs: tuple):
        self.context = _SpawnContext()
        super().__init__(
            workers, mp_context=self.context, initializer=initializer, initargs=initargs
        )


class WorkerDied(RuntimeError):
    """A worker process ended on its own (the OOM killer, a kill) with a job in flight: the
    pool broke (concurrent.futures' BrokenProcessPool). The CLI prints it as one line, exit 1."""


def _exit_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _start_worker(parent: int, initializer, initargs: tuple) -> None:
    # A worker exits once its parent is gone (kill -9, a scheduler's hard kill): an orphan
    # went on training and held its run's lock, so the rerun was refused; then it waited on
    # the pool's pipe for ever. Its run resumes from the last (atomic) checkpoint.
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()
    if initializer is not None:
        initializer(*initargs)


def worker_pool(workers: int, initializer=None, initargs: tuple = ()) -> ProcessPoolExecutor:
    """A pool of ``workers`` spawned processes that ignore Ctrl-C and exit when the parent
    dies; each runs ``initializer(*initargs)`` first."""
    return _Pool(workers, _start_worker, (os.getpid(), initializer, initargs))


def stop_pool(pool: ProcessPoolExecutor) -> None:
    """Stop a pool of ``worker_pool`` after an error or an interrupt: its workers are
    terminated rather than waited for (a run or chunk in flight is not wanted)."""
    children = [p for p in pool.context.started if p.is_alive()]
    for child in children:
        child.terminate()
    pool.shutdown(wait=False, cancel_futures=True)
    for child in children:
        child.join()
