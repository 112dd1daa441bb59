"""The systemd notify protocol (``sd_notify``), without dependencies.

Under ``Type=notify`` systemd passes a datagram socket in ``$NOTIFY_SOCKET``
and waits for ``READY=1``; with ``WatchdogSec=`` it passes ``$WATCHDOG_USEC``
and restarts the service unless ``WATCHDOG=1`` arrives in time. Outside
systemd (a terminal, Docker, tests without the variable) every call is a
harmless no-op that returns False.

    notify("READY=1\\nSTATUS=watching /srv/comfyui/output")
    notify("WATCHDOG=1")       # at least every watchdog_interval() / 2
    notify("STOPPING=1")
"""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send ``state`` (newline-separated ``KEY=value`` lines) to the service manager.

    Returns True when the datagram was sent, False when there is no
    ``$NOTIFY_SOCKET`` or sending failed (a notify failure must never stop the
    daemon). An address starting with ``@`` is a Linux abstract socket.
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        # Unset, or a form this module does not speak (vsock:CID:PORT).
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """The watchdog timeout in seconds, or None when no watchdog applies to this process.

    Like ``sd_watchdog_enabled``: ``$WATCHDOG_USEC`` must be a positive
    integer and, when ``$WATCHDOG_PID`` is set, it must be this process (a
    child that inherited the environment must not ping). Ping at least twice
    per interval.
    """
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid is not None:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 1_000_000
