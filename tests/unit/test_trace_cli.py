"""``vhostkit trace`` through its real entry point (subprocesses): ``--json``, ``--save``,
``trace show --filter``, clean stops on SIGTERM/SIGINT, bad arguments and bad files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from helpers.trace_proxy import TraceProcess

from vhostkit.trace import RecordKind, from_json
from vhostkit.user import BackendDevice, BackendListener, Frontend
from vhostkit.user.message import ProtocolFeature
from vhostkit.virtio.features import VirtioFeature

P = ProtocolFeature


def vhostkit(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vhostkit", *args], capture_output=True, text=True, timeout=timeout
    )


def test_live_json_save_and_show_filter(fd_check, sock_dir):
    saved = sock_dir / "trace.jsonl"
    device = BackendDevice(features=int(VirtioFeature.VERSION_1), num_queues=2)
    listener = BackendListener(sock_dir / "be.sock", lambda: device, max_connections=1).start()
    try:
        with TraceProcess(sock_dir / "fe.sock", sock_dir / "be.sock", saved, ["--json"]) as tr:
            with Frontend.connect(sock_dir / "fe.sock", timeout=5) as fe:
                fe.set_owner()
                fe.negotiate(int(VirtioFeature.VERSION_1), P.MQ | P.REPLY_ACK)
                for index in (0, 1):
                    fe.set_vring_num(index, 128)
                assert fe.get_vring_base(1) == 0
            tr.wait_for_line(r'"summary":"session 1: front-end closed the connection')
        assert tr.returncode == 0, tr.output
    finally:
        listener.stop()
        device.close()
    assert not (sock_dir / "fe.sock").exists()
    assert "vhostkit trace: stopped (SIGTERM)" in tr.output
    # stdout was JSON, one record per line, the same records as the saved file
    live = [from_json(line) for line in tr.lines if line.startswith("{")]
    records = tr.records()
    assert live == records
    requests = [r.request for r in records if r.kind is RecordKind.MESSAGE and not r.is_reply]
    assert requests == [
        "SET_OWNER", "GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES",
        "SET_FEATURES", "SET_VRING_NUM", "SET_VRING_NUM", "GET_VRING_BASE",
    ]  # fmt: skip

    shown = vhostkit("trace", "show", str(saved), "--filter", "SET_VRING_NUM")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert len(lines) == 4  # two requests, two acks (REPLY_ACK)
    assert all(" SET_VRING_NUM " in line for line in lines)
    assert "ring 1 num 128" in lines[2] and "(reply to #" in lines[3]

    shown = vhostkit("trace", "show", str(saved), "--filter", "get_*", "--filter", "SET_OWNER")
    names = [line.split()[4] for line in shown.stdout.splitlines()]
    assert set(names) == {"GET_FEATURES", "GET_PROTOCOL_FEATURES", "GET_VRING_BASE", "SET_OWNER"}
    assert len(names) == 7  # three GETs answered, SET_OWNER without NEED_REPLY (not yet acked)

    everything = vhostkit("trace", "show", str(saved))
    assert len(everything.stdout.splitlines()) == len(records)  # events included
    assert "--  session 1: front-end connected to" in everything.stdout
    as_json = vhostkit("trace", "show", str(saved), "--json", "--filter", "SET_OWNER,SET_FEATURES")
    assert [json.loads(line)["request"] for line in as_json.stdout.splitlines()] == [
        "SET_OWNER",
        "SET_FEATURES",
        "SET_FEATURES",
    ]


def test_show_reports_bad_lines_and_missing_files(tmp_path):
    good = '{"kind":"event","session":1,"seq":0,"t":0.0,"summary":"hello"}'
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good + "\nnot json\n")
    res = vhostkit("trace", "show", str(bad))
    assert res.returncode == 1
    assert "hello" in res.stdout
    assert f"{bad}:2: not a trace record" in res.stderr
    res = vhostkit("trace", "show", str(tmp_path / "missing.jsonl"))
    assert res.returncode == 1 and "No such file" in res.stderr


def test_arguments_and_sigint(sock_dir):
    res = vhostkit("trace", "--listen", str(sock_dir / "x.sock"))
    assert res.returncode == 2 and "--connect PATH" in res.stderr
    regular = sock_dir / "regular"
    regular.write_text("")
    res = vhostkit("trace", "--listen", str(regular), "--connect", str(sock_dir / "be.sock"))
    assert res.returncode == 1 and "exists and is not a socket" in res.stderr
    proc = subprocess.Popen(
        [sys.executable, "-m", "vhostkit", "trace", "--listen", str(sock_dir / "fe.sock"),
         "--connect", str(sock_dir / "be.sock")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        assert proc.stderr.readline().startswith("vhostkit trace: listening on")
        assert (sock_dir / "fe.sock").is_socket()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "proxy stopping on SIGINT" in out and "stopped (SIGINT)" in err
    assert not os.path.exists(sock_dir / "fe.sock")
