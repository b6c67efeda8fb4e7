"""vhost-user back-end devices built on :class:`vhostkit.user.backend.ring_device.RingDevice`.

* :mod:`vhostkit.devices.net`: tap-backed virtio-net (the userspace twin of vhost-net).
* :mod:`vhostkit.devices.blk`: file-backed virtio-blk.

Each module runs as a standalone daemon: ``python3 -m vhostkit.devices.net --help``.
"""
