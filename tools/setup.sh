#!/usr/bin/env bash
# Install everything vhostkit's tests need on a fresh Debian machine: the apt packages listed
# in tools/apt-packages.txt (real peers: DPDK testpmd, QEMU, qemu-storage-daemon; the kernel VM
# harness's parts), the Python package with its test extra, and the cached kernel VM image.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

mapfile -t pkgs < <(grep -v '^\s*#' "$here/apt-packages.txt" | sed '/^\s*$/d')
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${#missing[@]} apt packages: ${missing[*]}"
    $SUDO apt-get -o DPkg::Lock::Timeout=300 update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
        --no-install-recommends "${missing[@]}" >/dev/null
fi

echo "setup: installing vhostkit with its test extra"
python3 -m pip install -q --disable-pip-version-check -e "$root[test]"

if [ -d "$root/vhostkit/testing/kernel_vm" ]; then
    echo "setup: preparing the kernel VM (Debian kernel with vhost_net and vhost_vsock)"
    python3 -m vhostkit.testing.kernel_vm prepare
fi
echo "setup: done"
