"""What the processes of a multi-process run tell each other: that one of them failed, and why.

Without it, a process that fails (a missing data file on one host, a bad row, a bug) leaves the others blocked in
their next collective until JAX's coordination service times out (heartbeat_timeout_seconds, 100 s by default),
and they die with a coordination error that does not say what went wrong. With it:

    the failing process   writes its message under `jsft/failed/<its index>` in JAX's distributed key-value store
                          (the coordination service the processes already share, hosted by process 0) and exits
                          with its own status (process 0 first waits until the others have read it)
    every other process   a watcher thread polls that directory every POLL_S seconds; on a failure it prints
                          `error: process <i> failed: <message>` and exits with status 1, wherever it was blocked

JAX has no public key-value API (multihost_utils only syncs devices), so this uses jax._src.distributed's client.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

POLL_S = 0.5
ACK_WAIT_S = 10.0
FAILED, SEEN = "jsft/failed/", "jsft/seen/"
FAILURE_EXIT = 1


def _client():
    from jax._src import distributed

    return distributed.global_state.client


class Peers:
    """Started after jax.distributed is up, in every process of a run with process_count > 1."""

    def __init__(self, process_index: int, process_count: int):
        self.index, self.count = process_index, process_count
        self.client = _client()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="jsft-peers", daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.done.wait(POLL_S):
            try:
                failures = self.client.key_value_dir_get(FAILED)
            except Exception:  # the service is gone (its process exited): JAX's own heartbeat stops this one
                return
            others = [(key, value) for key, value in failures if key.rsplit("/", 1)[-1] != str(self.index)]
            if others and not self.done.is_set():
                key, message = others[0]
                with contextlib.suppress(Exception):
                    self.client.key_value_set(f"{SEEN}{self.index}", "1")
                print(f"error: process {key.rsplit('/', 1)[-1]} of {self.count} failed, so this process "
                      f"({self.index}) stops too: {message}", file=sys.stderr, flush=True)
                self._leave(FAILURE_EXIT)  # the main thread may be blocked in a collective that never completes

    def failed(self, message: str, exit_status: int) -> None:
        """This process failed: tell the others and exit (the caller has printed the message). Never returns."""
        self.done.set()
        with contextlib.suppress(Exception):  # best effort: a peer or the service already gone changes nothing
            self.client.key_value_set(f"{FAILED}{self.index}", message[:4000])
        self._leave(exit_status)

    def _leave(self, exit_status: int) -> None:
        """Exit now; process 0 hosts the key-value store, so it first waits (ACK_WAIT_S at most) until every other
        process has read the failure (or failed too): leaving earlier would take the message down with it."""
        deadline = time.monotonic() + ACK_WAIT_S
        while self.index == 0 and time.monotonic() < deadline:
            try:
                answered = {key.rsplit("/", 1)[-1] for prefix in (SEEN, FAILED)
                            for key, _ in self.client.key_value_dir_get(prefix)}
            except Exception:
                break
            if answered >= {str(i) for i in range(1, self.count)}:
                break
            time.sleep(POLL_S / 5)
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(exit_status)  # not jax.distributed.shutdown: its barrier waits for processes that are gone

    def stop(self) -> None:
        """The run ended on this process without failing: stop watching."""
        self.done.set()
        self.thread.join(timeout=2 * POLL_S)


active: Peers | None = None  # this process's, while a multi-process run is on (jsft.cli reports failures to it)


def start(process_index: int, process_count: int) -> None:
    global active
    active = Peers(process_index, process_count) if process_count > 1 else None


def stop() -> None:
    global active
    if active is not None:
        active.stop()
    active = None
