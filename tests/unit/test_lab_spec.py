"""The lab file format: shipped labs parse, and each kind of mistake names its line and key."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vhostkit.lab.errors import LabFileError
from vhostkit.lab.locate import key_lines
from vhostkit.lab.spec import GuestKind, Plane, StepKind, load_lab, parse_lab, parse_size

LABS = Path(__file__).resolve().parents[2] / "labs"

GOOD = """\
[lab]
name = "demo"
timeout = 60

[[bridge]]
name = "br0"

[[namespace]]
name = "host"
  [[namespace.link]]
  bridge = "br0"
  address = "10.77.0.1/24"

[[guest]]
name = "a"
kind = "virtual"
  [[guest.nic]]
  bridge = "br0"
  plane = "offload"
  address = "10.77.0.2/24"

[[guest]]
name = "b"
kind = "linux"
  [[guest.nic]]
  bridge = "br0"
  dhcp = true
  [[guest.disk]]
  size = "16M"

[[step]]
do = "stream"
name = "s1"
from = "a"
to = "host"
background = true

[[step]]
do = "swap"
guest = "a"
to = "vhostkit"

[[step]]
do = "stop"
step = "s1"
expect = { lost_max = 0, duplicates_max = 0 }

[[step]]
do = "run"
guest = "b"
command = "ip -br addr"
expect = { output_matches = "10\\\\.77" }
"""


def issues_of(text: str) -> list[tuple[int | None, str, str]]:
    with pytest.raises(LabFileError) as info:
        parse_lab(text, "lab.toml")
    return [(i.line, i.key, i.message) for i in info.value.issues]


def only_issue(text: str) -> tuple[int | None, str, str]:
    found = issues_of(text)
    assert len(found) == 1, found
    return found[0]


def test_a_good_lab_becomes_values() -> None:
    lab = parse_lab(GOOD, "lab.toml")
    assert lab.name == "demo" and lab.timeout == 60
    assert [g.kind for g in lab.guests] == [GuestKind.VIRTUAL, GuestKind.LINUX]
    assert lab.guests[0].nics[0].plane is Plane.OFFLOAD
    assert lab.guests[1].nics[0].plane is Plane.VHOSTKIT  # the default
    assert lab.guests[1].disks[0].size == 16 << 20
    stream, swap, stop, run = lab.steps
    assert stream.kind is StepKind.STREAM and stream.background and stream.params["rate"] == 1000
    assert swap.name == "swap-2" and swap.params == {"guest": "a", "nic": 0, "to": "vhostkit"}
    assert stop.expect == {"lost_max": 0, "duplicates_max": 0}
    assert run.expect == {"output_matches": r"10\.77"}
    assert stream.line == 31 and run.line == 48
    assert lab.needs_kernel_vhost and lab.needs_qemu


@pytest.mark.parametrize("path", sorted(LABS.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_labs_are_valid(path: Path) -> None:
    lab = load_lab(path)
    assert lab.steps, "a shipped lab does something"
    assert path.read_text().startswith("# "), "a shipped lab opens with a comment header"


def test_shipped_labs_exist() -> None:
    assert (LABS / "01-bridge-ping.toml").exists()


# --- each kind of mistake, with its line ------------------------------------------------------


def test_not_toml_names_the_line() -> None:
    line, _, message = only_issue('[lab]\nname = "x"\ncount = = 3\n')
    assert line == 3 and "not valid TOML" in message


def test_unknown_key_suggests_the_right_one() -> None:
    text = GOOD.replace('  plane = "offload"', '  plane = "offload"\n  adress = "10.77.0.9/24"')
    line, key, message = only_issue(text)
    assert line == 20 and key == "guest[0].nic[0].adress"
    assert "did you mean 'address'" in message


def test_wrong_type() -> None:
    line, key, message = only_issue(GOOD.replace("timeout = 60", 'timeout = "soon"'))
    assert (line, key) == (3, "lab.timeout") and "must be a number, not a string" in message


def test_missing_required_key() -> None:
    text = GOOD.replace('do = "run"\nguest = "b"\n', 'do = "run"\n')
    line, key, message = only_issue(text)
    assert line == 48 and key == "step[3]" and "missing required key 'guest'" in message


def test_a_nic_on_a_bridge_that_does_not_exist() -> None:
    text = GOOD.replace(
        '  bridge = "br0"\n  plane = "offload"', '  bridge = "br1"\n  plane = "offload"'
    )
    line, key, message = only_issue(text)
    assert (line, key) == (18, "guest[0].nic[0].bridge")
    assert "no bridge called 'br1' (bridges: br0)" in message


def test_a_swap_to_a_plane_the_nic_cannot_use() -> None:
    text = GOOD.replace('guest = "a"\nto = "vhostkit"', 'guest = "b"\nto = "kernel"')
    line, key, message = only_issue(text)
    assert (line, key) == (41, "step[1].to")
    assert "linux guest's NIC can only be swapped between offload and vhostkit" in message


def test_an_unknown_plane_is_spelled_out() -> None:
    line, key, message = only_issue(GOOD.replace('plane = "offload"', 'plane = "kernal"'))
    assert (line, key) == (19, "guest[0].nic[0].plane")
    assert "not one of kernel, vhostkit, offload; did you mean 'kernel'?" in message


def test_an_unknown_step_kind() -> None:
    line, key, message = only_issue(GOOD.replace('do = "swap"', 'do = "swapp"'))
    assert (line, key) == (39, "step[1].do") and "did you mean 'swap'" in message


def test_a_reference_to_an_unknown_guest() -> None:
    line, key, message = only_issue(GOOD.replace('guest = "a"\nto', 'guest = "c"\nto'))
    assert (line, key) == (40, "step[1].guest") and "no guest called 'c' (guests: a, b)" in message


def test_stop_of_a_step_that_is_not_running() -> None:
    line, key, message = only_issue(GOOD.replace('step = "s1"', 'step = "s2"'))
    assert (line, key) == (45, "step[2].step") and "running: s1" in message


def test_bad_address_and_mac() -> None:
    text = GOOD.replace(
        'address = "10.77.0.2/24"', 'address = "10.77.0.2"\n  mac = "03:00:00:00:00:01"'
    )
    found = issues_of(text)
    assert (20, "guest[0].nic[0].address") in [(ln, k) for ln, k, _ in found]
    assert any(k == "guest[0].nic[0].mac" and "multicast" in m for _, k, m in found)
    assert any("needs a prefix length" in m for _, _, m in found)


def test_public_addresses_are_refused() -> None:
    line, key, message = only_issue(GOOD.replace("10.77.0.1/24", "8.8.8.8/24"))
    assert (line, key) == (12, "namespace[0].link[0].address") and "not a private" in message


def test_duplicate_names() -> None:
    text = GOOD.replace(
        '[[bridge]]\nname = "br0"\n', '[[bridge]]\nname = "br0"\n[[bridge]]\nname = "br0"\n'
    )
    line, key, message = only_issue(text)
    assert (line, key) == (8, "bridge[1].name") and "already the name of bridge[0]" in message


def test_an_expectation_the_step_cannot_measure() -> None:
    text = GOOD.replace('to = "vhostkit"', 'to = "vhostkit"\nexpect = { lost_max = 0 }')
    line, key, message = only_issue(text)
    assert (line, key) == (42, "step[1].expect.lost_max") and "unknown key" in message


def test_a_virtual_guest_cannot_run_commands_or_have_disks() -> None:
    text = GOOD.replace('guest = "b"\ncommand', 'guest = "a"\ncommand')
    assert only_issue(text)[2] == "'a' is a virtual guest: it has no shell"
    text = GOOD.replace('"10.77.0.2/24"', '"10.77.0.2/24"\n  [[guest.disk]]\n  size = "1M"')
    assert only_issue(text)[:2] == (21, "guest[0].disk[0]")


def test_every_mistake_is_reported_at_once() -> None:
    text = GOOD.replace("timeout = 60", "timeout = -1").replace('do = "swap"', 'do = "nope"')
    assert {key for _, key, _ in issues_of(text)} == {"lab.timeout", "step[1].do"}


def test_a_missing_file_is_a_lab_file_error(tmp_path: Path) -> None:
    with pytest.raises(LabFileError, match="cannot read the file"):
        load_lab(tmp_path / "none.toml")


def test_key_lines_follow_nested_arrays_and_multiline_values() -> None:
    text = textwrap.dedent(
        """\
        [a]
        x = [
          1,
          2,
        ]
        y = '''
        z = 1
        '''
        [[b]]
        k = 1
          [[b.c]]
          k = 2
          [[b.c]]
          k = 3
        [[b]]
          [[b.c]]
          k = 4
        """
    )
    lines = key_lines(text)
    assert lines[("a", "x")] == 2 and lines[("a", "y")] == 6 and ("a", "z") not in lines
    assert lines[("b", 0, "c", 1, "k")] == 14 and lines[("b", 1, "c", 0, "k")] == 17


def test_sizes() -> None:
    assert parse_size("64M") == 64 << 20 and parse_size("1GiB") == 1 << 30
    assert parse_size(4096) == 4096
    with pytest.raises(ValueError):
        parse_size("lots")


def test_the_annotated_example_in_the_labs_readme_is_a_valid_lab() -> None:
    text = (LABS / "README.md").read_text()
    example = text.split("```toml\n", 1)[1].split("```", 1)[0]
    lab = parse_lab(example, "labs/README.md")
    assert [s.kind for s in lab.steps] == [
        StepKind.PING,
        StepKind.STREAM,
        StepKind.LINK,
        StepKind.WAIT,
        StepKind.LINK,
        StepKind.STOP,
    ]


def test_a_nic_on_the_guests_own_vhost_net_cannot_be_swapped() -> None:
    line, key, message = only_issue(GOOD.replace('plane = "offload"', 'plane = "kernel"'))
    assert (line, key) == (41, "step[1].to")
    assert "virtual guest's NIC can only be swapped between offload and vhostkit" in message
    assert "(this NIC starts on kernel)" in message


#: Kinds of mistake, each made in GOOD (or alone), with the line, key and words
#: ``vhostkit lab check`` must print for it.
MISTAKES = {
    "not-toml": (None, "count = = 3", 3, "", "not valid TOML"),
    "unknown-key": (
        ('  plane = "offload"', '  plane = "offload"\n  adress = "10.77.0.9/24"'),
        None, 20, "guest[0].nic[0].adress", "did you mean 'address'",
    ),
    "wrong-type": (
        ("timeout = 60", 'timeout = "soon"'), None, 3, "lab.timeout", "must be a number"
    ),
    "missing-key": (
        ('do = "run"\nguest = "b"\n', 'do = "run"\n'), None, 48, "step[3]",
        "missing required key 'guest'",
    ),
    "no-such-bridge": (
        ('  bridge = "br0"\n  plane = "offload"', '  bridge = "br1"\n  plane = "offload"'),
        None, 18, "guest[0].nic[0].bridge", "no bridge called 'br1'",
    ),
    "swap-plane": (
        ('guest = "a"\nto = "vhostkit"', 'guest = "b"\nto = "kernel"'), None, 41, "step[1].to",
        "can only be swapped between offload and vhostkit",
    ),
    "unknown-plane": (
        ('plane = "offload"', 'plane = "kernal"'), None, 19, "guest[0].nic[0].plane",
        "did you mean 'kernel'",
    ),
    "unknown-step": (
        ('do = "swap"', 'do = "swapp"'), None, 39, "step[1].do", "did you mean 'swap'"
    ),
    "unknown-guest": (
        ('guest = "a"\nto', 'guest = "c"\nto'), None, 40, "step[1].guest",
        "no guest called 'c' (guests: a, b)",
    ),
    "stop-not-running": (
        ('step = "s1"', 'step = "s2"'), None, 45, "step[2].step", "running: s1"
    ),
    "public-address": (
        ("10.77.0.1/24", "8.8.8.8/24"), None, 12, "namespace[0].link[0].address", "not a private"
    ),
    "duplicate-name": (
        ('[[bridge]]\nname = "br0"\n', '[[bridge]]\nname = "br0"\n[[bridge]]\nname = "br0"\n'),
        None, 8, "bridge[1].name", "already the name of bridge[0]",
    ),
    "unmeasured-expectation": (
        ('to = "vhostkit"', 'to = "vhostkit"\nexpect = { lost_max = 0 }'), None, 42,
        "step[1].expect.lost_max", "unknown key",
    ),
    "shell-in-virtual-guest": (
        ('guest = "b"\ncommand', 'guest = "a"\ncommand'), None, 50, "step[3].guest",
        "'a' is a virtual guest: it has no shell",
    ),
}  # fmt: skip


def test_lab_check_prints_each_kind_of_mistake_with_its_line(tmp_path: Path) -> None:
    """Through the real entry point: one ``vhostkit lab check`` over a file per mistake."""
    assert len(MISTAKES) >= 10
    paths = []
    for name, (change, alone, *_) in MISTAKES.items():
        path = tmp_path / f"{name}.toml"
        if alone is not None:
            text = f'[lab]\nname = "x"\n{alone}\n'
        else:
            assert change is not None and change[0] in GOOD, name
            text = GOOD.replace(change[0], change[1])
        path.write_text(text)
        paths.append(str(path))
    done = subprocess.run(
        [sys.executable, "-m", "vhostkit", "lab", "check", *paths],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stdout.splitlines()
    for name, (_, _, line, key, words) in MISTAKES.items():
        where = f"{tmp_path / name}.toml:{line}: " + (f"{key}: " if key else "")
        mine = [text for text in lines if text.startswith(where)]
        assert mine and words in mine[0], (name, where, lines)
    assert len(lines) == len(MISTAKES), lines  # one message per mistake, nothing else


def test_every_shipped_lab_is_run_by_the_suite() -> None:
    """tests/kernel runs the labs that need kernel vhost-net, tests/host those that need
    neither it nor QEMU (both pick them by those properties), and tests/guests names each lab
    with linux guests; none needs both (it would be refused: nested TCG)."""
    tests = LABS.parent / "tests"
    kernel = (tests / "kernel" / "test_kernel_lab.py").read_text()
    host = (tests / "host" / "test_lab_run.py").read_text()
    linux = (tests / "guests" / "test_lab_linux.py").read_text()
    assert "if load_lab(p).needs_kernel_vhost]" in kernel
    assert "if not load_lab(p).needs_kernel_vhost and not load_lab(p).needs_qemu" in host
    for path in sorted(LABS.glob("*.toml")):
        lab = load_lab(path)
        if lab.needs_qemu:
            assert not lab.needs_kernel_vhost, path.name
            assert f'LABS / "{path.name}"' in linux, f"{path.name} is not run by tests/guests"
