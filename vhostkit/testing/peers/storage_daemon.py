"""``qemu-storage-daemon`` as a vhost-user-blk back-end peer, exporting an image file."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Self

from vhostkit.testing.peers.process import PathLike, PeerProcess

__all__ = ["QemuStorageDaemon"]


class QemuStorageDaemon(PeerProcess):
    """``qemu-storage-daemon`` exporting ``image`` as a vhost-user-blk back-end at ``socket_path``.

    With ``create_size`` the image file is created (sparse) with that many bytes first. Ready
    when its pid file holds its pid: the daemon writes it after every export is listening and
    before it accepts connections (documented ordering).

    Quirks (QEMU 7.2): protocol features 0x8f2b (CONFIG, CONFIGURE_MEM_SLOTS, REPLY_ACK, ...),
    GET_MAX_MEM_SLOTS 32, GET_QUEUE_NUM 1 (``num_queues`` changes it), GET_CONFIG of up to 60
    bytes with the capacity in 512-byte sectors at offset 0. Accepts reconnects.
    """

    name = "qemu-storage-daemon"

    def __init__(
        self,
        image: PathLike,
        socket_path: PathLike,
        *,
        create_size: int | None = None,
        writable: bool = True,
        num_queues: int | None = None,
        logical_block_size: int | None = None,
        pidfile: PathLike | None = None,
        extra_args: Sequence[str] = (),
        binary: str = "qemu-storage-daemon",
        ready_timeout: float = 20.0,
        stop_timeout: float = 5.0,
        log_path: PathLike | None = None,
    ) -> None:
        self.image = Path(image)
        self.socket_path = Path(socket_path)
        self.create_size = create_size
        self.pidfile = (
            Path(pidfile) if pidfile is not None else Path(f"{os.fspath(socket_path)}.pid")
        )
        export = (
            f"type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,"
            f"addr.path={os.fspath(socket_path)},writable={'on' if writable else 'off'}"
        )
        if num_queues is not None:
            export += f",num-queues={num_queues}"
        if logical_block_size is not None:
            export += f",logical-block-size={logical_block_size}"
        argv = [
            binary,
            "--blockdev",
            f"driver=file,node-name=file0,filename={os.fspath(image)}",
            "--export",
            export,
            "--pidfile",
            os.fspath(self.pidfile),
            *extra_args,
        ]
        super().__init__(
            argv, ready_timeout=ready_timeout, stop_timeout=stop_timeout, log_path=log_path
        )

    def start(self) -> Self:
        if self.create_size is not None:
            with self.image.open("wb") as f:
                f.truncate(self.create_size)
        return super().start()

    def _pidfile_ready(self) -> bool:
        try:
            text = self.pidfile.read_text().strip()
        except OSError:
            return False
        return self.proc is not None and text == str(self.proc.pid)

    def _wait_ready(self) -> None:
        self.wait_until(self._pidfile_ready, f"pid file {self.pidfile}")

    def _cleanup(self) -> None:
        # the daemon removes its socket and pid file on a clean exit; not after SIGKILL
        for path in (self.pidfile, self.socket_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
