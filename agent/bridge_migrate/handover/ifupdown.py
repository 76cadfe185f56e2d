"""ifupdown (Debian's, with bridge-utils): the NIC's `iface` stanzas become the bridge's, with
`bridge_ports NIC`, `bridge_hw MAC`, STP off and no forward delay; the NIC is left `inet manual`
and taken out of its `auto`/`allow-hotplug` lines (brought up on its own at boot, it would take
addresses from router advertisements before the bridge takes it in: the bridge's hook brings it
up as its port). ifupdown's state (/run/network/ifstate) is made to say what a boot with the new
files would: the bridge up, the NIC not by itself.

ifupdown is no daemon: what it knows is its files. A DHCP client that ifup started is moved by
its own hand-over (clients.py); ifup would start the same client at boot.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .. import sysctl
from ..model import HostState, Sysctl
from .files import FileChange, FileState, read_state, write_states

INTERFACES = "/etc/network/interfaces"
STATE_DIR = "/run/network"
# bridge-utils' hook, which makes a bridge of `bridge_ports` at ifup (ifupdown has none itself).
BRIDGE_HOOK = "/etc/network/if-pre-up.d/bridge"
IFUPDOWN2 = "/usr/share/ifupdown2"  # another program, reading the same file: not this one
_MAX_SOURCED = 64  # files read through `source`: bounded, as loops are possible
_CLIENTS = {"dhclient", "dhcpcd", "udhcpc", "pump", "dhcpcd-bin"}

# Words that start a stanza (interfaces(5)); every other line belongs to the stanza above.
_STANZAS = ("iface", "mapping", "auto", "source", "source-directory", "rename", "template")
_STANZA_PREFIXES = ("allow-", "no-auto-down", "no-scripts")
_COMMANDS = {"pre-up", "up", "post-up", "down", "pre-down", "post-down"}
# The options each method takes (ifupdown 0.8's inet.defn and inet6.defn), carried to the bridge.
_OPTIONS = {
    ("inet", "static"): {
        "address",
        "netmask",
        "broadcast",
        "metric",
        "gateway",
        "pointopoint",
        "scope",
        "mtu",
    },
    ("inet", "dhcp"): {"hostname", "metric", "leasehours", "leasetime", "vendor", "client", "mtu"},
    ("inet6", "static"): {
        "address",
        "netmask",
        "gateway",
        "media",
        "accept_ra",
        "autoconf",
        "privext",
        "scope",
        "preferred-lifetime",
        "dad-attempts",
        "dad-interval",
        "mtu",
    },
    ("inet6", "auto"): {
        "privext",
        "accept_ra",
        "dhcp",
        "request_prefix",
        "ll-attempts",
        "ll-interval",
        "mtu",
    },
    ("inet6", "dhcp"): {"accept_ra", "autoconf", "request_prefix", "ll-attempts", "ll-interval"},
}
_DHCP = {("inet", "dhcp"), ("inet6", "dhcp")}
# The lines that bring an interface up by itself (ifup -a, udev's hotplug).
_CLASSES = ("auto", "allow-auto", "allow-hotplug")


@dataclass(frozen=True)
class IfupdownView:
    nic: str
    bridge: str
    files: tuple[tuple[str, FileState], ...]  # interfaces and what it sources, in reading order
    ifstate: FileState  # /run/network/ifstate: "iface=logical" per configured interface
    nic_state: FileState  # /run/network/ifstate.NIC (ifupdown's per-interface lock and state)
    bridge_state: FileState
    bridge_utils: bool  # its hook is installed
    ifupdown2: bool
    dhcp_client: bool  # a DHCP client serves the NIC (what `inet dhcp` started)


@dataclass(frozen=True)
class IfupdownAdoption:
    nic: str
    bridge: str
    # ifupdown's state (/run/network): the bridge up, the NIC not by itself. Not among the
    # configuration files: after a restart /run starts empty, and the state of before written
    # there (as a restart mid-transaction puts the files back) would have ifup skip the NIC.
    state: tuple[FileChange, ...]
    # The NIC's settings before. `ifup` set some on it (an inet6 method's accept_ra, autoconf,
    # privext, ...); bridge-utils turns addr_gen_mode off on a port whenever ifup brings the
    # bridge up; a boot makes the NIC anew with the defaults. The way back restores them, as
    # `ifup NIC` would have set them.
    sysctls: tuple[Sysctl, ...]


# -- reading --------------------------------------------------------------------------------


def read(nic: str, bridge: str) -> IfupdownView:
    return IfupdownView(
        nic=nic,
        bridge=bridge,
        files=_read_files(),
        ifstate=read_state(f"{STATE_DIR}/ifstate"),
        nic_state=read_state(f"{STATE_DIR}/ifstate.{nic}"),
        bridge_state=read_state(f"{STATE_DIR}/ifstate.{bridge}"),
        bridge_utils=os.path.exists(BRIDGE_HOOK),
        ifupdown2=os.path.isdir(IFUPDOWN2),
        dhcp_client=_client_serves(nic),
    )


def _read_files() -> tuple[tuple[str, FileState], ...]:
    """/etc/network/interfaces and every file it sources, each once, as ifupdown reads them."""
    queue, found = [INTERFACES], dict[str, FileState]()
    while queue and len(found) < _MAX_SOURCED:
        path = queue.pop(0)
        if path in found:
            continue
        state = read_state(path)
        found[path] = state
        for kind, pattern in sourced(state.text or "", path):
            names = sorted(glob.glob(pattern))
            if kind == "source-directory":
                names = [p for p in names if re.fullmatch(r"[\w-]+", Path(p).name)]
            queue += [p for p in names if os.path.isfile(p)]
    return tuple(found.items())


def sourced(text: str, path: str) -> list[tuple[str, str]]:
    """(keyword, glob) of each `source`/`source-directory` line, relative to `path`'s directory."""
    found = []
    for words in (line.split() for line in _logical_lines(text)):
        if len(words) == 2 and words[0] in ("source", "source-directory", "source-dir"):
            name = words[1] if os.path.isabs(words[1]) else f"{Path(path).parent}/{words[1]}"
            kind = "source" if words[0] == "source" else "source-directory"
            found.append((kind, f"{name}/*" if kind == "source-directory" else name))
    return found


def _client_serves(nic: str) -> bool:
    own = _netns("self")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        except OSError:
            continue
        words = [w.decode(errors="replace") for w in argv]
        name = Path(words[0].split()[0]).name.rstrip(":") if words and words[0] else ""
        if name in _CLIENTS and nic in " ".join(words).split() and _netns(entry) == own:
            return True
    return False


def _netns(pid: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


# -- the files as ifupdown reads them ------------------------------------------------------


@dataclass(frozen=True)
class Stanza:
    """A stanza of an interfaces file: its first line's words and its option lines."""

    words: tuple[str, ...]
    start: int  # index of its first line in the file's lines
    end: int  # index after its last option line (comments and blank lines after it excluded)
    options: tuple[tuple[str, str], ...]  # (name, value) in order
    indent: str  # of its first option line

    @property
    def kind(self) -> str:
        return self.words[0]


def _logical_lines(text: str) -> list[str]:
    return [line for _, _, line in _numbered(text)]


def _numbered(text: str) -> list[tuple[int, int, str]]:
    """(first line, line after, text) of each line as ifupdown reads it: a line ending in a
    backslash goes on on the next one."""
    lines = text.splitlines()
    out: list[tuple[int, int, str]] = []
    i = 0
    while i < len(lines):
        first, line = i, lines[i]
        while line.endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line[:-1] + lines[i]
        i += 1
        out.append((first, i, line))
    return out


def stanzas(text: str) -> tuple[Stanza, ...]:
    found: list[Stanza] = []
    head: tuple[tuple[str, ...], int] | None = None  # (words, first line) of the open stanza
    end, indent, options = 0, "", list[tuple[str, str]]()
    for first, after, line in _numbered(text):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if _starts_stanza(words[0]):
            if head is not None:
                found.append(Stanza(head[0], head[1], end, tuple(options), indent))
            head, end, indent, options = (tuple(words), first), after, "", []
        elif head is not None:
            indent = indent if options else line[: len(line) - len(line.lstrip())]
            options.append((words[0], " ".join(words[1:])))
            end = after
    if head is not None:
        found.append(Stanza(head[0], head[1], end, tuple(options), indent))
    return tuple(found)


def _starts_stanza(word: str) -> bool:
    return word in _STANZAS or word.startswith(_STANZA_PREFIXES) or word == "source-dir"


# -- the plan -------------------------------------------------------------------------------


def plan(view: IfupdownView, state: HostState, bridge: str) -> tuple[FileChange, ...] | str:
    """The files rewritten, or why ifupdown's configuration cannot be handed over."""
    nic = view.nic
    if view.ifupdown2:
        return f"ifupdown2 is installed ({IFUPDOWN2}): its state is not ifupdown's"
    if not view.bridge_utils:
        return (
            f"bridge-utils is not installed ({BRIDGE_HOOK}), so ifupdown could not bring "
            f"{bridge} up at boot: install it (apt-get install bridge-utils) and try again"
        )
    parsed = [(path, s, stanzas(s.text or "")) for path, s in view.files]
    holding = sorted({path for path, _, found in parsed for x in found if _is_iface(x, nic)})
    if not holding:
        return f"no `iface {nic}` stanza in {INTERFACES} or the files it sources"
    if len(holding) > 1:
        return f"{nic}'s stanzas are spread over {', '.join(holding)}"
    problem = _refusal(parsed, nic, bridge, view.dhcp_client)
    if problem:
        return problem
    changes = []
    for path, before, found in parsed:
        if before.text is None:
            continue  # gone since it was listed: nothing of the NIC's in it
        text = _rewritten(before.text, found, nic, bridge, state.nic.mac, path == holding[0])
        if text != before.text:
            changes.append(FileChange(path, before, FileState(text, before.mode)))
    return tuple(changes)


def _is_iface(s: Stanza, name: str) -> bool:
    return s.kind == "iface" and len(s.words) >= 2 and s.words[1] == name


def _refusal(
    parsed: list[tuple[str, FileState, tuple[Stanza, ...]]], nic: str, bridge: str, client: bool
) -> str | None:
    """Why the stanzas cannot be carried as they are, if they cannot."""
    for path, _, found in parsed:
        for s in found:
            named = s.words[1:]
            where = f"{path}:{s.start + 1}"
            if s.kind == "mapping" and any(fnmatch.fnmatch(nic, p) for p in named):
                return f"{where} maps {nic} to logical interfaces, not carried"
            if bridge in named and s.kind not in ("source", "source-directory", "source-dir"):
                return f"{where} names {bridge} already"
            if nic in named and s.kind.startswith(("no-auto-down", "no-scripts")):
                return f"{where}: `{s.kind} {nic}` is not carried"
            if nic in named and s.kind.startswith("allow-") and s.kind not in _CLASSES:
                return f"{where}: `{s.kind}` (a class of ifup --allow) is not carried"
            if _is_iface(s, nic):
                problem = _iface_refusal(s, client)
                if problem:
                    return f"{where}: {problem}"
    return None


def _iface_refusal(s: Stanza, client: bool) -> str | None:
    if len(s.words) != 4:
        return f"`{' '.join(s.words)}` is not `iface NAME FAMILY METHOD`"
    family, method = s.words[2], s.words[3]
    allowed = _OPTIONS.get((family, method))
    if allowed is None:
        return f"method {family} {method} is not carried (static, dhcp; inet6 also auto)"
    if (family, method) in _DHCP and not client:
        return f"{family} dhcp, but no DHCP client serves it: its lease would lapse"
    commands = [name for name, _ in s.options if name in _COMMANDS]
    if commands:
        return (
            f"it runs commands ({', '.join(dict.fromkeys(commands))}) that may name the NIC: "
            "not carried"
        )
    unknown = [n for n, _ in s.options if n not in allowed and not n.startswith("dns-")]
    if unknown:
        return f"options not carried: {', '.join(dict.fromkeys(unknown))}"
    return None


_HEADER = "# bridge-migrate: {nic} is {bridge}'s port; {bridge} has {nic}'s addressing"


def _rewritten(
    text: str, found: tuple[Stanza, ...], nic: str, bridge: str, mac: str, holding: bool
) -> str:
    """The file with the NIC out of its auto/allow lines and, in the file that held them, its
    stanzas replaced by the bridge's (where the first one was)."""
    lines = text.splitlines()
    replaced: dict[int, list[str]] = {}  # first line -> new lines, for [start, end)
    ends: dict[int, int] = {}
    ifaces = [s for s in found if _is_iface(s, nic)]
    for s in found:
        if s.kind in _CLASSES and nic in s.words[1:]:
            rest = [w for w in s.words[1:] if w != nic]
            replaced[s.start] = [" ".join([s.kind, *rest])] if rest else []
            ends[s.start] = s.end
    if holding and ifaces:
        replaced[ifaces[0].start] = _bridge_block(ifaces, nic, bridge, mac)
        ends[ifaces[0].start] = ifaces[0].end
        for s in ifaces[1:]:
            start = _with_blank_before(lines, s.start, replaced)
            replaced[start], ends[start] = [], s.end
    out: list[str] = []
    i = 0
    while i < len(lines):
        if i in replaced:
            out += replaced[i]
            i = ends[i]
            continue
        out.append(lines[i])
        i += 1
    return "\n".join(out) + ("\n" if text.endswith("\n") or not text else "")


def _with_blank_before(lines: list[str], start: int, replaced: dict[int, list[str]]) -> int:
    """A removed stanza takes the blank line before it along (unless that is being replaced)."""
    before = start - 1
    if before >= 0 and not lines[before].strip() and before not in replaced:
        return before
    return start


def _bridge_block(ifaces: list[Stanza], nic: str, bridge: str, mac: str) -> list[str]:
    indent = next((s.indent for s in ifaces if s.indent), "    ")
    out = [_HEADER.format(nic=nic, bridge=bridge), f"iface {nic} inet manual", "", f"auto {bridge}"]
    params = (
        ("bridge_ports", nic),
        ("bridge_hw", mac),
        ("bridge_stp", "off"),
        ("bridge_fd", "0"),
    )
    for n, s in enumerate(ifaces):
        if n:
            out.append("")
        out.append(f"iface {bridge} {s.words[2]} {s.words[3]}")
        options = (*params, *s.options) if n == 0 else s.options
        out += [f"{indent}{name} {value}".rstrip() for name, value in options]
    return out


def _state_changes(view: IfupdownView, bridge: str) -> tuple[FileChange, ...]:
    """ifupdown's state as a boot with the new files leaves it: the bridge up, the NIC not
    configured by itself (its lock file is kept, emptied, as ifdown leaves it)."""
    nic = view.nic
    before = view.ifstate.text or ""
    kept = [line for line in before.splitlines() if line.split("=", 1)[0] not in (nic, bridge)]
    changes = [
        FileChange(
            f"{STATE_DIR}/ifstate",
            view.ifstate,
            FileState("".join(f"{line}\n" for line in [*kept, f"{bridge}={bridge}"])),
        ),
        FileChange(f"{STATE_DIR}/ifstate.{bridge}", view.bridge_state, FileState(f"{bridge}\n")),
    ]
    if view.nic_state.exists:
        emptied = FileState("\n", view.nic_state.mode)
        changes.append(FileChange(f"{STATE_DIR}/ifstate.{nic}", view.nic_state, emptied))
    return tuple(c for c in changes if c.before != c.after)


def adoption(view: IfupdownView, state: HostState, bridge: str) -> IfupdownAdoption:
    return IfupdownAdoption(
        view.nic, bridge, _state_changes(view, bridge), state.sysctls_on(view.nic)
    )


# -- the running system ---------------------------------------------------------------------


def adopt(a: IfupdownAdoption, until: float) -> None:
    """Nothing runs to be told: ifupdown reads its files and its state at the next ifup or
    ifdown (a DHCP client it started is moved by its own hand-over). Its state says br0 is up."""
    write_states(a.state)


def readopt(a: IfupdownAdoption, until: float) -> None:
    """ifupdown's state as it was (the NIC up, not the bridge), and the NIC's settings as they
    were, where they differ now."""
    write_states(c.inverse() for c in a.state)
    now = {(s.family, s.key): s.value for s in sysctl.read((a.nic,))}
    failed = []
    for s in a.sysctls:
        if now.get((s.family, s.key), s.value) != s.value:
            error = sysctl.write(s)
            if error:
                failed.append(f"{s.path}: {os.strerror(error)}")
    if failed:
        raise IfupdownError(f"{a.nic}'s settings could not be put back: {'; '.join(failed)}")


class IfupdownError(Exception):
    pass
