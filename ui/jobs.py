"""Run a blocking GPU job in a worker thread and stream what it reports, so a Gradio generator can yield
previews while the pipeline denoises.

``stream(work)`` calls ``work(emit)`` in a thread; everything passed to ``emit`` comes out of the iterator in
order, then the iterator returns. An exception in ``work`` is re-raised in the consumer. If the consumer stops
early (Gradio cancels the event, the browser goes away), the next ``emit`` raises :class:`Cancelled` inside
the worker, which aborts the pipeline at the end of the current denoising step.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator


class Cancelled(Exception):
    """The job was cancelled by its consumer."""


_DONE = object()


def stream(work: Callable[[Callable[[Any], None]], None], lock: threading.Lock | None = None) -> Iterator[Any]:
    """Yield what ``work`` emits while it runs in a worker thread (holding ``lock`` if given)."""
    events: queue.Queue = queue.Queue()
    cancelled = threading.Event()
    failure: list[BaseException] = []

    def emit(event: Any) -> None:
        if cancelled.is_set():
            raise Cancelled()
        events.put(event)

    def run() -> None:
        try:
            if lock is not None:
                with lock:
                    if cancelled.is_set():
                        return
                    work(emit)
            else:
                work(emit)
        except Cancelled:
            pass
        except BaseException as e:  # handed to the consumer
            failure.append(e)
        finally:
            events.put(_DONE)

    worker = threading.Thread(target=run, name="studio-job", daemon=True)
    worker.start()
    try:
        while True:
            event = events.get()
            if event is _DONE:
                break
            yield event
    finally:
        cancelled.set()
    worker.join()
    if failure:
        raise failure[0]
