"""``vhostkit trace`` as a peer process (the real entry point, in a subprocess)."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from vhostkit.testing.peers import PeerProcess
from vhostkit.trace import RecordKind, TraceRecord, from_json


class TraceProcess(PeerProcess):
    """``python3 -m vhostkit trace --listen L --connect C --save FILE [extra...]``.

    Ready once it says it is listening (the socket exists then); stopped with SIGTERM, which it
    handles by closing both connections and removing its socket. Its output (the text records
    and its status lines on stderr) is captured like any peer's; :meth:`records` reads the JSON
    lines it saved.
    """

    name = "vhostkit-trace"

    def __init__(
        self,
        listen: Path,
        connect: Path,
        save: Path,
        extra: Sequence[str] = (),
        **kw: object,
    ) -> None:
        self.listen = listen
        self.save = save
        argv = [
            sys.executable, "-m", "vhostkit", "trace", "--listen", os.fspath(listen),
            "--connect", os.fspath(connect), "--save", os.fspath(save), *extra,
        ]  # fmt: skip
        super().__init__(argv, **kw)  # type: ignore[arg-type]

    def _wait_ready(self) -> None:
        self.wait_for_line(r"^vhostkit trace: listening on ", self.ready_timeout)

    def _request_stop(self) -> bool:
        self._signal(signal.SIGTERM)
        return True

    def records(self) -> list[TraceRecord]:
        return [from_json(line) for line in self.save.read_text().splitlines() if line]

    def messages(self) -> list[TraceRecord]:
        return [r for r in self.records() if r.kind is RecordKind.MESSAGE]
