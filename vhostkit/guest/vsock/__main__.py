"""Entry point of ``python3 -m vhostkit.guest.vsock`` (see :func:`.driver.main`)."""

from vhostkit.guest.vsock.driver import main

if __name__ == "__main__":
    raise SystemExit(main())
