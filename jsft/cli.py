"""How the commands (`python -m jsft.train`, `jsft.export`, `jsft.chat`) end on a user's mistake.

A bad config, row, template, checkpoint or mesh raises one of jsft's own errors, whose message already names the
field or row and the fix; the command prints that message alone (no traceback) and exits with status 2 (3 for a
run that diverged, jsft.guard).
JSFT_TRACEBACK=1 shows the traceback too. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys


def user_errors() -> tuple[type[Exception], ...]:
    from jsft.config import ConfigError
    from jsft.data.chat import ChatTemplateError
    from jsft.data.formats import BadRowError
    from jsft.guard import Diverged
    from jsft.hf import CheckpointError
    from jsft.model.attention import AttentionUnavailable
    from jsft.model.llama import ModelConfigError
    from jsft.outdir import OutputDirError
    from jsft.sharding import ShardingError

    return ConfigError, BadRowError, ChatTemplateError, CheckpointError, ModelConfigError, ShardingError, \
        AttentionUnavailable, Diverged, OutputDirError


def run(main, argv=None):
    """main(argv), with jsft's user errors printed as `error: <message>` and exit status 2; a run stopped by a
    signal before it could save (jsft.signals) prints one line and exits 130 (SIGINT) or 143 (SIGTERM). In a
    multi-process run the other processes are told (jsft.peers), and stop too with this message."""
    from jsft.signals import Stopped

    try:
        return main(argv)
    except Stopped as e:
        _exit(f"stopped: {e}", e.exit_status)
    except user_errors() as e:
        if os.environ.get("JSFT_TRACEBACK"):
            _tell_peers(f"{type(e).__name__}: {e}", 2)
            raise
        _exit(f"error ({type(e).__name__}): {e}", getattr(e, "exit_status", 2))
    except Exception as e:  # a bug: its traceback, and the other processes told
        _tell_peers(f"{type(e).__name__}: {e}", 1, traceback=True)
        raise


def _exit(message: str, status: int):
    print(message, file=sys.stderr)
    _tell_peers(message, status)
    sys.exit(status)


def _tell_peers(message: str, status: int, traceback: bool = False) -> None:
    from jsft import peers

    if peers.active is not None:
        if traceback:
            import traceback as tb

            tb.print_exc()
        peers.active.failed(message, status)
