"""How a run stops on Ctrl-C (SIGINT) and SIGTERM (what SLURM, Kubernetes and `kill` send before they kill a job).

    before the first step (data, model, compilation)   the run stops at once: one line, exit 130 (SIGINT) / 143
    in the loop                                         the step finishes, a checkpoint is saved, the run stops with
                                                        exit 130 (SIGINT) / 143 (SIGTERM); the same command resumes
    a second signal                                     stop now, without that checkpoint (the ones before remain)

logging.save_on_sigterm=False: SIGTERM stops at once, even in the loop (TRL's behaviour without
enable_jit_checkpoint). Several processes: a signal to any one of them stops all at one agreed step (jsft.train
asks `agreed_stop` at each step boundary), each saving its part of that one checkpoint.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal: what a shell reports for it


class Stopped(BaseException):
    """A signal stopped the run where it could not save (before the first step, or a second signal). A
    BaseException, like KeyboardInterrupt, so no `except Exception` on the way swallows it."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum, self.exit_status = signum, EXIT_STATUS[signum]


class StopSignals:
    """SIGINT and SIGTERM handlers for one run; `requested` is the signal that asked the loop to stop, or None."""

    def __init__(self, save_on_sigterm: bool = True):
        self.save_on_sigterm = save_on_sigterm
        self.requested: int | None = None
        self.in_loop = False
        self.previous = {s: signal.signal(s, self._handle) for s in EXIT_STATUS}
        self.previous_unraisablehook, sys.unraisablehook = sys.unraisablehook, self._unraisable

    def start_loop(self) -> None:
        """From here on a signal lets the current step finish and saves a checkpoint."""
        self.in_loop = True

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if not self.in_loop:
            raise Stopped(signum, f"{name} before the first step: stopped; nothing was trained or saved")
        if self.requested is not None or (signum == signal.SIGTERM and not self.save_on_sigterm):
            why = "a second signal" if self.requested is not None else "logging.save_on_sigterm=False"
            raise Stopped(signum, f"{name} ({why}): stopped now, without saving this step; the checkpoints saved "
                                  "before remain")
        self.requested = signum
        print(f"\n{name}: finishing this step, saving a checkpoint, then stopping (a second signal stops at once)",
              flush=True)

    def _unraisable(self, unraisable) -> None:
        """A Stopped raised while Python runs a callback whose exceptions it only prints (a gc callback, __del__:
        e.g. jax's _xla_gc_callback) would be lost and the run go on: the signal is delivered again 10 ms later
        (from a timer thread; a handler called in the hook itself would raise inside it again)."""
        if isinstance(unraisable.exc_value, Stopped):
            signum = unraisable.exc_value.signum  # from a thread, a moment later: the callback has returned by then
            threading.Timer(0.01, os.kill, args=(os.getpid(), signum)).start()
        else:
            self.previous_unraisablehook(unraisable)

    def agreed_stop(self, step_no: int, multi_process: bool) -> bool:
        """Stop after this step? Several processes: True on every process at the same step once any of them got a
        signal (a max over processes of the requested flag, one tiny collective each step)."""
        if not multi_process:
            return self.requested is not None
        import numpy as np
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self.requested or 0))
        if self.requested is None and flags.max():
            self.requested = int(flags.max())  # another process's signal
            print(f"\n{signal.Signals(self.requested).name} on another process: saving a checkpoint at step "
                  f"{step_no}, then stopping", flush=True)
        return bool(flags.max())

    @property
    def exit_status(self) -> int:
        return EXIT_STATUS.get(self.requested, 0)

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        sys.unraisablehook = self.previous_unraisablehook
