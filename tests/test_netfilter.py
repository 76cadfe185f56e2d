"""The netfilter rewrite against the real kernel, in a throwaway network namespace per test.

libnftables acts on the caller's namespace: the module runs in a process started under
`ip netns exec`. Each namespace holds eth0 (a veth) and br0 (an empty bridge: the takeover
creates br0 before the rules are rewritten), and is deleted after the test, also on failure.
"""

from __future__ import annotations

import json
import secrets
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bridge_migrate import serde
from bridge_migrate.netfilter import NftChange, NftResult, NftRules, plan_rewrite

pytestmark = pytest.mark.root

CMD_TIMEOUT = 20.0  # bounds every command; each takes milliseconds
AGENT_DIR = str(Path(__file__).resolve().parent.parent / "agent")

DROP_SSH = """
table {family} filter {{
  chain input {{
    type filter hook input priority 0; policy drop;
    ct state established,related accept
    iifname "eth0" tcp dport 22 accept
    iifname "lo" accept
  }}
}}
"""


def _one_rule(family: str, rule: str) -> str:
    return f"add table {family} f\nadd chain {family} f c\nadd rule {family} f c {rule}\n"


@dataclass(frozen=True)
class Netns:
    name: str

    def run(self, *argv: str, stdin: str = "", check: bool = True) -> str:
        done = subprocess.run(
            ["ip", "netns", "exec", self.name, *argv],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=CMD_TIMEOUT,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"{argv}: {done.returncode}: {done.stderr}")
        return done.stdout

    def sh(self, line: str) -> str:
        return self.run(*shlex.split(line))

    def load(self, ruleset: str) -> None:
        self.run("nft", "-f", "-", stdin=ruleset)

    def ruleset(self) -> Any:
        return json.loads(self.run("nft", "-j", "list", "ruleset"))

    def text(self) -> str:
        return self.run("nft", "-a", "list", "ruleset")

    def python(self, code: str, stdin: str = "") -> str:
        return self.run("env", f"PYTHONPATH={AGENT_DIR}", sys.executable, "-c", code, stdin=stdin)

    def netfilter(self, *args: str, stdin: str = "") -> Any:
        module = ("env", f"PYTHONPATH={AGENT_DIR}", sys.executable, "-m")
        return json.loads(self.run(*module, "bridge_migrate.netfilter", *args, stdin=stdin))

    def read(self) -> NftRules:
        return serde.load(NftRules, self.netfilter("read", "eth0", "br0"))

    def apply(self, change: NftChange) -> NftResult:
        data = json.dumps(serde.to_data(change))
        return serde.load(NftResult, self.netfilter("apply", stdin=data))

    def undo(self, applied: NftChange) -> NftResult:
        data = json.dumps(serde.to_data(applied))
        return serde.load(NftResult, self.netfilter("undo", stdin=data))


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, timeout=CMD_TIMEOUT, capture_output=True)


@pytest.fixture
def ns() -> Iterator[Netns]:
    name = f"bm-nft-{secrets.token_hex(4)}"
    _ip("netns", "add", name)
    try:
        netns = Netns(name)
        netns.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
        netns.run("ip", "link", "add", "br0", "type", "bridge")
        netns.run("ip", "link", "set", "lo", "up")
        yield netns
    finally:
        _ip("netns", "del", name)


def round_trip(ns: Netns) -> tuple[NftRules, str]:
    """Read, plan, apply, check, undo, check: the ruleset after the undo is the one before."""
    before = ns.ruleset()
    rules = ns.read()
    assert rules.blockers == ()
    change = plan_rewrite(rules, "eth0", "br0")
    result = ns.apply(change)
    assert result.ok, result.error
    assert [r.after.handle for r in result.applied.rewrites] == [
        r.before.handle for r in change.rewrites
    ]  # replace keeps the handle (the kernel's echo says so)
    during = ns.text()
    again = ns.read()
    assert again.rules == ()  # nothing names eth0 any more (the rewritten rules name br0)
    assert again.blockers == ()  # rules naming only br0 are left as they are
    undone = ns.undo(result.applied)
    assert undone.ok, undone.error
    assert ns.ruleset() == before  # handles, order, counters: everything
    return rules, during


@pytest.mark.parametrize("family", ["inet", "ip", "ip6"])
def test_ssh_rule_under_drop_policy_is_moved_and_restored_exactly(ns: Netns, family: str) -> None:
    ns.load(DROP_SSH.format(family=family))
    rules, during = round_trip(ns)
    assert [(r.family, r.chain) for r in rules.rules] == [(family, "input")]
    assert 'iifname "br0" tcp dport 22 accept' in during
    assert '"eth0"' not in during


def test_every_rewritable_shape_round_trips(ns: Netns) -> None:
    ns.load(
        """
        table inet filter {
          chain input {
            type filter hook input priority 0; policy drop;
            iifname { "eth0", "lo" } accept
            iifname . tcp dport { "eth0" . 22, "lo" . 80 } accept
            iifname != "eth0" counter drop
            iifname "eth0" ip saddr 198.18.0.1 accept comment "from the gateway"
            iif "eth0" udp dport 53 accept
            iifname vmap { "eth0" : accept, "lo" : continue }
          }
          chain output {
            type filter hook output priority 0; policy accept;
            oifname "eth0" counter accept
            oif "eth0" quota 100 mbytes accept
          }
        }
        table ip nat {
          chain postrouting {
            type nat hook postrouting priority srcnat;
            oifname "eth0" masquerade
          }
          chain prerouting {
            type filter hook prerouting priority 0;
            fib daddr oif "eth0" accept
          }
        }
        """
    )
    rules, during = round_trip(ns)
    assert len(rules.rules) == 10
    assert '"eth0"' not in during
    assert 'iif "br0" udp dport 53' in during  # resolved to br0's index while it existed
    assert 'comment "from the gateway"' in during


def test_bridge_and_netdev_families_are_left_alone(ns: Netns) -> None:
    ns.load(
        """
        table bridge filter {
          chain forward {
            type filter hook forward priority 0;
            iifname "eth0" accept
          }
        }
        table netdev edge {
          chain ingress {
            type filter hook ingress device "eth0" priority 0;
            iifname "eth0" accept
          }
        }
        """
    )
    rules = ns.read()
    assert rules == NftRules((), ())


def test_empty_ruleset_reads_nothing(ns: Netns) -> None:
    out = ns.python(
        "import time\n"
        "from bridge_migrate import netfilter as n\n"
        "n._library()\n"
        "t = time.perf_counter(); r = n.read_nic_rules('eth0')\n"
        "ms = (time.perf_counter() - t) * 1e3\n"
        "print(r.rules, r.blockers, ms)\n"
    )
    rules, blockers, ms = out.split()
    assert (rules, blockers) == ("()", "()")
    assert float(ms) < 50  # ~0.5 ms here; generous for a loaded CI machine


@pytest.mark.parametrize(
    ("ruleset", "expected"),
    [
        (
            "add table inet f\n"
            'add set inet f ifs { type ifname; elements = { "eth0", "lo" }; }\n'
            "add chain inet f c\n"
            "add rule inet f c iifname @ifs accept",
            "named set ifs",
        ),
        (_one_rule("ip", 'iifname "eth*" accept'), 'wildcard "eth*"'),
        (_one_rule("ip6", 'iifname { "eth0", "br0" } accept'), 'names both "eth0" and "br0"'),
        (_one_rule("ip", 'dup to 198.18.0.9 device "eth0"'), "outside an interface"),
        (_one_rule("arp", 'iifname "eth*" accept'), 'wildcard "eth*"'),
    ],
)
def test_what_cannot_be_rewritten_exactly_is_refused_by_name(
    ns: Netns, ruleset: str, expected: str
) -> None:
    ns.load(ruleset)
    rules = ns.read()
    assert rules.rules == ()
    assert len(rules.blockers) == 1 and expected in rules.blockers[0]
    assert "handle" in rules.blockers[0] or "named set" in rules.blockers[0]


@pytest.mark.parametrize("rule", ['iifname "br0" accept', 'oifname "br*" drop'])
def test_a_rule_naming_only_the_bridge_is_left_alone(ns: Netns, rule: str) -> None:
    # Written by an admin for after the takeover: nothing to rename, nothing to refuse.
    ns.load(_one_rule("inet", rule))
    rules = ns.read()
    assert rules.rules == () and rules.blockers == ()


def test_a_rule_changed_since_reading_refuses_the_whole_change(ns: Netns) -> None:
    ns.load(DROP_SSH.format(family="inet") + 'add rule inet filter input oifname "eth0" accept\n')
    change = plan_rewrite(ns.read(), "eth0", "br0")
    handle = change.rewrites[0].before.handle
    ns.sh(
        f'nft replace rule inet filter input handle {handle} iifname "eth0" tcp dport 2222 accept'
    )
    before = ns.ruleset()
    result = ns.apply(change)
    assert not result.ok and "changed since it was read" in result.error
    assert f"handle {handle} is now" in result.error
    assert ns.ruleset() == before


def test_a_new_rule_naming_the_nic_refuses_the_change(ns: Netns) -> None:
    ns.load(DROP_SSH.format(family="ip"))
    change = plan_rewrite(ns.read(), "eth0", "br0")
    ns.run("nft", "add", "rule", "ip", "filter", "input", "iifname", "eth0", "udp", "dport", "53")
    before = ns.ruleset()
    result = ns.apply(change)
    assert not result.ok and "new rule naming eth0" in result.error
    assert ns.ruleset() == before


@pytest.mark.parametrize("gone", ["rule", "chain"])
def test_the_transaction_is_all_or_nothing(ns: Netns, gone: str) -> None:
    """The guard is bypassed (it sees the ruleset of before the deletion, as in a race), so
    the kernel itself rejects the second replacement: the first must not stay."""
    ns.load(
        DROP_SSH.format(family="inet")
        + "add chain inet filter other\n"
        + 'add rule inet filter other oifname "eth0" accept\n'
    )
    delete = {
        "rule": "'delete rule inet filter other handle ' + str(change.rewrites[1].before.handle)",
        "chain": "'flush chain inet filter other; delete chain inet filter other'",
    }[gone]
    out = ns.python(
        "import json\n"
        "from bridge_migrate import netfilter as n\n"
        "change = n.plan_rewrite(n.read_nic_rules('eth0'), 'eth0', 'br0')\n"
        "assert len(change.rewrites) == 2, change\n"
        "stale = n.list_ruleset()\n"
        f"n.nft({delete})\n"
        "n.list_ruleset = lambda: stale\n"
        "r = n.apply_change(change)\n"
        "print(json.dumps([r.ok, r.error]))\n"
    )
    ok, error = json.loads(out)
    assert not ok and error
    text = ns.text()
    assert 'iifname "eth0" tcp dport 22 accept' in text and "br0" not in text


def test_undo_runs_again_harmlessly_and_refuses_a_rule_changed_meanwhile(ns: Netns) -> None:
    ns.load(DROP_SSH.format(family="inet") + 'add rule inet filter input oifname "eth0" accept\n')
    before = ns.ruleset()
    result = ns.apply(plan_rewrite(ns.read(), "eth0", "br0"))
    assert result.ok
    assert ns.undo(result.applied).ok
    second = ns.undo(result.applied)  # e.g. a rollback after a crash that followed the undo
    assert second.ok and second.applied.rewrites == ()
    assert ns.ruleset() == before

    result = ns.apply(plan_rewrite(ns.read(), "eth0", "br0"))
    handle = result.applied.rewrites[0].after.handle
    ns.run("nft", "delete", "rule", "inet", "filter", "input", "handle", str(handle))
    failed = ns.undo(result.applied)
    assert not failed.ok and f"handle {handle} is gone" in failed.error
    assert 'oifname "br0"' in ns.text()  # nothing half-undone


def test_iptables_nft_rules_are_rewritten_and_still_read_by_iptables(ns: Netns) -> None:
    ns.run("iptables-nft", "-P", "INPUT", "DROP")
    ns.sh("iptables-nft -A INPUT -i eth0 -p tcp --dport 22 -j ACCEPT")
    ns.sh("iptables-nft -A OUTPUT -o eth0 -j ACCEPT")
    ns.sh("ip6tables-nft -A INPUT -i eth0 -j ACCEPT")
    saved = _iptables_save(ns)
    rules = ns.read()
    assert len(rules.rules) == 3 and rules.blockers == ()
    result = ns.apply(plan_rewrite(rules, "eth0", "br0"))
    assert result.ok, result.error
    listed = ns.run("iptables-nft", "-S")
    assert "-A INPUT -i br0 -p tcp -m tcp --dport 22 -j ACCEPT" in listed
    assert "-A OUTPUT -o br0 -j ACCEPT" in listed
    assert "-A INPUT -i br0 -j ACCEPT" in ns.run("ip6tables-nft", "-S")
    assert ns.undo(result.applied).ok
    assert _iptables_save(ns) == saved


def test_iptables_nft_rules_with_xtables_matches_are_refused(ns: Netns) -> None:
    ns.sh("iptables-nft -A INPUT -i eth0 -m comment --comment ssh -j ACCEPT")
    rules = ns.read()
    assert rules.rules == ()
    assert len(rules.blockers) == 1 and "iptables-nft" in rules.blockers[0]
    assert "ip filter INPUT handle" in rules.blockers[0]


def test_legacy_iptables_rules_naming_the_nic_are_refused(ns: Netns) -> None:
    ns.sh("iptables-legacy -A INPUT -i eth0 -j ACCEPT")
    ns.sh("iptables-legacy -A INPUT -i lo -j ACCEPT")
    ns.sh("ip6tables-legacy -t mangle -A POSTROUTING -o eth+ -j ACCEPT")
    rules = ns.read()
    assert rules.rules == ()
    assert len(rules.blockers) == 2
    assert "-A INPUT -i eth0 -j ACCEPT" in rules.blockers[0]
    assert "table mangle" in rules.blockers[1] and "-o eth+" in rules.blockers[1]
    assert all("by hand or to nftables" in b for b in rules.blockers)


def test_reading_fifty_rules_and_applying_is_fast(ns: Netns) -> None:
    lines = [f'add rule inet filter input iifname "eth0" tcp dport {p} accept' for p in range(50)]
    ns.load(DROP_SSH.format(family="inet") + "\n".join(lines) + "\n")
    started = time.monotonic()
    out = ns.python(
        "import json, time\n"
        "from bridge_migrate import netfilter as n\n"
        "n._library()\n"
        "t0 = time.perf_counter(); rules = n.read_nic_rules('eth0')\n"
        "t1 = time.perf_counter(); change = n.plan_rewrite(rules, 'eth0', 'br0')\n"
        "t2 = time.perf_counter(); r = n.apply_change(change)\n"
        "t3 = time.perf_counter(); u = n.undo_change(r.applied)\n"
        "t4 = time.perf_counter()\n"
        "ms = [round((b - a) * 1e3, 2) for a, b in [(t0, t1), (t1, t2), (t2, t3), (t3, t4)]]\n"
        "print(json.dumps([len(change.rewrites), r.ok, u.ok, ms]))\n"
    )
    count, ok, undone, ms = json.loads(out)
    assert (count, ok, undone) == (51, True, True)
    assert time.monotonic() - started < CMD_TIMEOUT
    assert all(m < 1000 for m in ms), ms  # read, plan, apply, undo: a few ms each here


def _iptables_save(ns: Netns) -> list[str]:
    """iptables-nft-save and ip6tables-nft-save without their dated comment lines."""
    text = ns.run("iptables-nft-save") + ns.run("ip6tables-nft-save")
    return [line for line in text.splitlines() if not line.startswith("#")]
