#!/bin/busybox sh
# PID 1 of the live-migration test's guest (tests/guests/test_guest_migration.py). It lives in
# an initramfs of its own: the kernel VM's usual root, the host's / over virtio-9p, cannot be
# used here, since QEMU refuses to migrate while a 9p share is mounted.
#
# It brings up the virtio NIC (@GUEST_IP@/24) and pings @PEER_IP@ five times a second, and
# writes the virtio disk over and over, one 4 KiB block at a time with O_DIRECT: block b of
# pass g is 64 copies of one 64-byte line naming b and g, so that the host can check every
# block on its own; each write is read back at once (O_DIRECT) and compared, and a copy of
# what the disk must hold is kept in guest RAM (/tmp/expect). When "stop" arrives on the
# console (after the migration, on the destination) the writer ends its block, the whole disk
# is read back and compared with the copy, ping prints its summary, and the guest powers off.
# Every line the host looks for starts with "mig: " (ping's own lines go out as they are).
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /tmp
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /tmp
stty -echo

BLOCKS=@BLOCKS@
fail() {
    echo "mig: FAILED: $*"
    poweroff -f
}

echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6
for m in @MODULES@; do
    insmod "/lib/modules/@VERSION@/$m" || echo "mig: insmod $m failed"
done
n=0
until [ -b /dev/vda ] && [ -e /sys/class/net/eth0 ]; do
    n=$((n + 1))
    [ $n -gt 100 ] && fail "no /dev/vda or eth0"
    sleep 0.1
done
ip link set lo up
ip link set eth0 up || fail "eth0 up"
ip addr add @GUEST_IP@/24 dev eth0 || fail "eth0 address"
dd if=/dev/zero of=/tmp/expect bs=4096 count=$BLOCKS 2>/dev/null || fail "/tmp/expect"
echo "mig: ready $(cat /sys/block/vda/size) sectors, features net $(cat /sys/class/net/eth0/device/features) blk $(cat /sys/block/vda/device/features)"

writer() {
    gen=0
    while :; do
        gen=$((gen + 1))
        b=0
        while [ $b -lt $BLOCKS ]; do
            [ -e /tmp/stop ] && { echo "mig: writer stopped at block $b pass $gen"; return 0; }
            line=$(printf 'vhostkit migration test: block %06d pass %06d ~~~~~~~~~~~~~' $b $gen)
            yes "$line" | head -c 4096 > /tmp/blk
            dd if=/tmp/blk of=/dev/vda bs=4096 seek=$b count=1 oflag=direct 2>/dev/null \
                || echo "mig: MISMATCH: write error at block $b pass $gen"
            dd if=/tmp/blk of=/tmp/expect bs=4096 seek=$b count=1 conv=notrunc 2>/dev/null
            dd if=/dev/vda bs=4096 skip=$b count=1 iflag=direct 2>/dev/null | cmp -s - /tmp/blk \
                || echo "mig: MISMATCH: block $b pass $gen read back wrong"
            b=$((b + 1))
            [ $((b % 16)) -eq 0 ] && echo "mig: wrote $b of pass $gen"
        done
        echo "mig: pass $gen done"
    done
}

writer &
wpid=$!
ping -i 0.2 @PEER_IP@ &
ppid=$!
while read -r cmd; do
    [ "$cmd" = stop ] && break
done
touch /tmp/stop
wait $wpid
kill -INT $ppid
wait $ppid
if dd if=/dev/vda bs=65536 iflag=direct 2>/dev/null | cmp - /tmp/expect; then
    echo "mig: verify ok $(sha256sum /tmp/expect | cut -d' ' -f1)"
else
    echo "mig: verify FAILED"
fi
echo "mig: done"
poweroff -f
