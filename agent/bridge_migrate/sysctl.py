"""Per-device settings (net.ipv4.conf.DEV.*, net.ipv6.conf.DEV.*): read from /proc/sys, written
over netlink where the kernel takes them (IPv4: IFLA_INET_CONF), through /proc/sys otherwise.

A new bridge starts with the "default" values whatever the NIC had (rp_filter, arp_ignore,
accept_ra, forwarding, ...): the planner copies every value in which the NIC differs.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from .model import AF_INET, AF_INET6, Sysctl

PROC = Path("/proc/sys/net")
# Values that follow the device rather than describe behaviour: the MTU is the link's (set on
# the bridge already), stable_secret reads EIO until set.
_DERIVED: dict[int, set[str]] = {AF_INET6: {"mtu"}, AF_INET: set()}

# include/uapi/linux/ip.h: IPV4_DEVCONF_*, the attribute numbers inside IFLA_INET_CONF.
IPV4_DEVCONF = {
    name: number
    for number, name in enumerate(
        (
            "forwarding",
            "mc_forwarding",
            "proxy_arp",
            "accept_redirects",
            "secure_redirects",
            "send_redirects",
            "shared_media",
            "rp_filter",
            "accept_source_route",
            "bootp_relay",
            "log_martians",
            "tag",
            "arp_filter",
            "medium_id",
            "disable_xfrm",
            "disable_policy",
            "force_igmp_version",
            "arp_announce",
            "arp_ignore",
            "promote_secondaries",
            "arp_accept",
            "arp_notify",
            "accept_local",
            "src_valid_mark",
            "proxy_arp_pvlan",
            "route_localnet",
            "igmpv2_unsolicited_report_interval",
            "igmpv3_unsolicited_report_interval",
            "ignore_routes_with_linkdown",
            "drop_unicast_in_l2_multicast",
            "drop_gratuitous_arp",
            "bc_forwarding",
            "arp_evict_nocarrier",
        ),
        start=1,
    )
}


def read(devs: tuple[str, ...]) -> tuple[Sysctl, ...]:
    """The writable settings of each of `devs` that exists ("default" always does)."""
    found = []
    for family in (AF_INET, AF_INET6):
        for dev in devs:
            found.extend(_read_dev(family, dev))
    return tuple(found)


def _read_dev(family: int, dev: str) -> list[Sysctl]:
    directory = PROC / f"ipv{4 if family == AF_INET else 6}" / "conf" / dev
    try:
        dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return []  # no such device, or IPv6 disabled on the kernel command line
    try:
        # Relative to the directory, one open and one read each: a device has ~60 settings.
        return [
            Sysctl(family, dev, key, value)
            for key in sorted(os.listdir(dirfd))
            if key not in _DERIVED[family] and (value := _read_writable(dirfd, key)) is not None
        ]
    finally:
        os.close(dirfd)


def _read_writable(dirfd: int, key: str) -> str | None:
    """The value, if the setting can be written (and read)."""
    try:
        fd = os.open(key, os.O_RDONLY, dir_fd=dirfd)
        try:
            if not os.fstat(fd).st_mode & 0o200:
                return None
            return " ".join(os.read(fd, 4096).decode().split())
        finally:
            os.close(fd)
    except OSError as e:
        if e.errno in (errno.EIO, errno.EINVAL, errno.EPERM, errno.EACCES):
            return None  # stable_secret unset; settings the namespace may not read
        raise


def by_netlink(s: Sysctl) -> bool:
    return s.family == AF_INET and s.key in IPV4_DEVCONF


def write(s: Sysctl) -> int:
    """Set `s` through /proc/sys; 0, or the errno the kernel answered with."""
    path = PROC / f"ipv{4 if s.family == AF_INET else 6}" / "conf" / s.dev / s.key
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    except OSError as e:
        return e.errno or errno.EIO
    try:
        os.write(fd, s.value.encode())
    except OSError as e:
        return e.errno or errno.EIO
    finally:
        os.close(fd)
    return 0
