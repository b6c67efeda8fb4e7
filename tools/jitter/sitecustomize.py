"""With ``JITTER_SUBPROC=1`` and this folder on ``PYTHONPATH``, Python subprocesses of the
tests (back-end daemons, helpers) get the jitter of :mod:`jitter` too."""

import os
import sys

if os.environ.get("JITTER_SUBPROC") == "1" and os.environ.get("JITTER_MODE", "worker") != "off":
    try:
        import jitter

        jitter.install()
    except Exception as exc:  # a hunting aid must not stop the process it rides in
        print(f"jitter: not installed in this process: {exc!r}", file=sys.stderr)
