"""How the commands (`python -m jsft.train`, `jsft.export`, `jsft.chat`) end on a user's mistake.

A bad config, row, template, checkpoint or mesh raises one of jsft's own errors, whose message already names the
field or row and the fix; the command prints that message alone (no traceback) and exits with status 2.
JSFT_TRACEBACK=1 shows the traceback too. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys


def user_errors() -> tuple[type[Exception], ...]:
    from jsft.config import ConfigError
    from jsft.data.chat import ChatTemplateError
    from jsft.data.formats import BadRowError
    from jsft.hf import CheckpointError
    from jsft.model.attention import AttentionUnavailable
    from jsft.model.llama import ModelConfigError
    from jsft.outdir import OutputDirError
    from jsft.sharding import ShardingError

    return ConfigError, BadRowError, ChatTemplateError, CheckpointError, ModelConfigError, ShardingError, \
        AttentionUnavailable, OutputDirError


def run(main, argv=None):
    """main(argv), with jsft's user errors printed as `error: <message>` and exit status 2."""
    try:
        return main(argv)
    except user_errors() as e:
        if os.environ.get("JSFT_TRACEBACK"):
            raise
        print(f"error ({type(e).__name__}): {e}", file=sys.stderr)
        sys.exit(2)
