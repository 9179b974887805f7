"""Every model replica's running and waiting rows, gathered for `GET /health`.

A Serve deployment handle reaches *some* replica, never each one, so the counts travel the other
way: every model replica pushes its counts, every ``REPORT_EVERY_S``, to one small Ray actor per
application (``CountsBoard``), and the front reads the board. The front creates the board and
owns it, so it goes away with the application (nothing is left on a shared cluster); a replica that
finds no board yet (the front is still starting, or was replaced) looks again at its next report.
A replica that stops reporting (killed, or its node lost) drops off the board after ``STALE_AFTER_S``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import ray

REPORT_EVERY_S = 0.5
STALE_AFTER_S = 5.0


def board_name(app_name: str) -> str:
    """The board's actor name (in the replicas' namespace, "serve"): one per application."""
    return f"dlp-lora-replica-counts:{app_name}"


@ray.remote(num_cpus=0, max_restarts=0)
class CountsBoard:
    """The last counts each model replica reported, and when."""

    def __init__(self) -> None:
        self._reports: dict[str, tuple[float, dict]] = {}

    def report(self, replica: str, counts: dict) -> None:
        self._reports[replica] = (time.monotonic(), counts)

    def snapshot(self) -> list[dict]:
        """[{"replica": id, "reported_s_ago": s, **counts}] of the replicas heard within STALE_AFTER_S."""
        now = time.monotonic()
        for replica in [r for r, (at, _) in self._reports.items() if now - at > STALE_AFTER_S]:
            del self._reports[replica]
        return [{"replica": replica, "reported_s_ago": round(now - at, 2), **counts}
                for replica, (at, counts) in sorted(self._reports.items())]


def open_board(app_name: str):
    """The application's board, created if the front is the first to ask (called by the front)."""
    return CountsBoard.options(name=board_name(app_name), get_if_exists=True).remote()


class CountsReporter:
    """A daemon thread in a model replica: sends ``read_counts()`` to the board every REPORT_EVERY_S.

    Fire and forget: a report that fails (no board yet, the board's owner replaced) is dropped and
    the board is looked up again next time; serving never waits on it.
    """

    def __init__(self, app_name: str, replica: str, read_counts: Callable[[], dict]) -> None:
        self._name, self._replica, self._read = board_name(app_name), replica, read_counts
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dlp-lora-counts", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        board, last = None, None
        while not self._stop.wait(REPORT_EVERY_S):
            try:
                if last is not None and ray.wait([last], timeout=0)[0]:
                    ray.get(last)  # raises when the board died: look it up again
                if board is None:
                    board = ray.get_actor(self._name)
                last = board.report.remote(self._replica, self._read())
            except Exception:  # noqa: BLE001 - no board yet, or it was replaced: look it up next time
                board, last = None, None

    def stop(self) -> None:
        self._stop.set()
