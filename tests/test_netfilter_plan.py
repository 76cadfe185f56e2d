"""The netfilter rewrite as data: classification, planning, rendering. No root, no kernel.

Rule objects are shaped as `nft -j list ruleset` prints them (nftables 1.0.6).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge_migrate import netfilter as nf
from bridge_migrate import serde
from bridge_migrate.netfilter import NftChange, NftResult, NftRule, NftRules


def meta(key: str) -> Any:
    return {"meta": {"key": key}}


def match(left: Any, right: Any, op: str = "==") -> Any:
    return {"match": {"op": op, "left": left, "right": right}}


TCP22 = match({"payload": {"protocol": "tcp", "field": "dport"}}, 22)
ACCEPT: Any = {"accept": None}


def ruleset(*exprs: Any, family: str = "inet", extra: tuple[Any, ...] = ()) -> list[Any]:
    objects: list[Any] = [
        {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
        {"table": {"family": family, "name": "filter", "handle": 7}},
        *extra,
    ]
    for handle, expr in enumerate(exprs, start=4):
        rule = {"family": family, "table": "filter", "chain": "input", "handle": handle}
        objects.append({"rule": {**rule, "expr": expr}})
    return objects


def rewritten(expr: Any, family: str = "inet") -> str:
    rules = nf.classify(ruleset(expr, family=family), "eth0", "br0")
    assert rules.blockers == ()
    (rewrite,) = nf.plan_rewrite(rules, "eth0", "br0").rewrites
    return rewrite.after.text


def blockers(*exprs: Any, extra: tuple[Any, ...] = ()) -> tuple[str, ...]:
    rules = nf.classify(ruleset(*exprs, extra=extra), "eth0", "br0")
    assert rules.rules == ()
    return rules.blockers


def test_the_plan_line_reads_like_nft() -> None:
    rules = nf.classify(ruleset([match(meta("iifname"), "eth0"), TCP22, ACCEPT]), "eth0", "br0")
    change = nf.plan_rewrite(rules, "eth0", "br0")
    assert str(change.rewrites[0]) == (
        'inet filter input handle 4: iifname "eth0" tcp dport 22 accept'
        ' -> iifname "br0" tcp dport 22 accept'
    )
    assert str(change).startswith("replace rule inet filter input handle 4: ")


@pytest.mark.parametrize(
    ("expr", "text"),
    [
        ([match(meta("oifname"), "eth0"), {"masquerade": None}], 'oifname "br0" masquerade'),
        ([match(meta("iifname"), "eth0", "!="), {"drop": None}], 'iifname != "br0" drop'),
        ([match(meta("iif"), "eth0"), ACCEPT], 'iif "br0" accept'),
        ([match(meta("oif"), "eth0"), ACCEPT], 'oif "br0" accept'),
        (
            [match(meta("iifname"), {"set": ["lo", "eth0"]}), ACCEPT],
            'iifname { "lo", "br0" } accept',
        ),
        (
            [
                match(
                    {
                        "concat": [
                            meta("iifname"),
                            {"payload": {"protocol": "tcp", "field": "dport"}},
                        ]
                    },
                    {"set": [{"concat": ["eth0", 22]}, {"concat": ["lo", 80]}]},
                ),
                ACCEPT,
            ],
            'iifname . tcp dport { "br0" . 22, "lo" . 80 } accept',
        ),
        (
            [{"vmap": {"key": meta("iifname"), "data": {"set": [["eth0", ACCEPT]]}}}],
            'iifname vmap { "br0" : accept }',
        ),
        (
            [match({"fib": {"result": "oif", "flags": ["daddr"]}}, "eth0"), ACCEPT],
            'fib daddr oif "br0" accept',
        ),
        (
            [match(meta("iifname"), "eth0"), {"counter": {"packets": 3, "bytes": 180}}, ACCEPT],
            'iifname "br0" counter packets 3 bytes 180 accept',
        ),
    ],
)
def test_every_place_an_interface_is_compared_is_renamed(expr: Any, text: str) -> None:
    assert rewritten(expr) == text


def test_the_arp_family_is_rewritten_too() -> None:
    # ARP from a port reaches the arp family's hooks with the bridge as input device.
    assert rewritten([match(meta("iifname"), "eth0"), ACCEPT], family="arp") == (
        'iifname "br0" accept'
    )


@pytest.mark.parametrize("family", ["bridge", "netdev"])
def test_bridge_and_netdev_families_keep_their_meaning(family: str) -> None:
    objects = ruleset([match(meta("iifname"), "eth0"), ACCEPT], family=family)
    assert nf.classify(objects, "eth0", "br0") == NftRules((), ())


def test_rules_not_naming_the_nic_are_not_kept() -> None:
    objects = ruleset([match(meta("iifname"), "lo"), ACCEPT], [TCP22, ACCEPT])
    assert nf.classify(objects, "eth0", "br0") == NftRules((), ())


def test_a_named_set_holding_the_nic_is_refused_with_its_users() -> None:
    named = {
        "set": {
            "family": "inet",
            "name": "ifs",
            "table": "filter",
            "type": "ifname",
            "handle": 2,
            "elem": ["lo", "eth0"],
        }
    }
    (blocker,) = blockers([match(meta("iifname"), "@ifs"), ACCEPT], extra=(named,))
    assert "named set ifs" in blocker and "input handle 4" in blocker


@pytest.mark.parametrize(
    ("expr", "why"),
    [
        ([match(meta("iifname"), "eth*"), ACCEPT], 'wildcard "eth*" matches "eth0"'),
        ([match(meta("iifname"), {"set": ["e*", "lo"]}), ACCEPT], 'wildcard "e*"'),
        (
            [match(meta("iifname"), {"set": ["eth0", "br0"]}), ACCEPT],
            'names both "eth0" and "br0"',
        ),
        ([{"dup": {"addr": "198.18.0.9", "dev": "eth0"}}], "outside an interface match"),
        (
            [match(meta("iifname"), "eth0"), {"xt": {"type": "match", "name": "comment"}}, ACCEPT],
            "iptables-nft",
        ),
    ],
)
def test_what_cannot_be_renamed_exactly_is_refused_naming_the_rule(expr: Any, why: str) -> None:
    (blocker,) = blockers(expr)
    assert blocker.startswith("inet filter input handle 4: ") and why in blocker


def test_a_flowtable_on_the_nic_is_refused() -> None:
    flowtable = {
        "flowtable": {
            "family": "inet",
            "table": "filter",
            "name": "ft",
            "handle": 3,
            "hook": "ingress",
            "prio": 0,
            "dev": "eth0",
        }
    }
    (blocker,) = blockers(extra=(flowtable,))
    assert "flowtable ft" in blocker


def test_plan_refuses_rules_with_blockers() -> None:
    with pytest.raises(ValueError, match="block the takeover"):
        nf.plan_rewrite(NftRules((), ("something",)), "eth0", "br0")


def sample_change() -> NftChange:
    expr = [match(meta("iifname"), "eth0"), {"counter": {"packets": 0, "bytes": 0}}, ACCEPT]
    objects = ruleset(expr)
    objects[-1]["rule"]["comment"] = 'say "hi"'
    return nf.plan_rewrite(nf.classify(objects, "eth0", "br0"), "eth0", "br0")


def test_changes_and_results_survive_the_record() -> None:
    change = sample_change()
    assert change.inverse().inverse() == change
    assert change.inverse().rewrites[0].after == change.rewrites[0].before
    result = NftResult(True, "", change)
    data = json.loads(json.dumps(serde.to_data(result)))
    assert serde.load(NftResult, data) == result


def test_the_guard_ignores_counters_and_nothing_else() -> None:
    rule = sample_change().rewrites[0].before
    counted = rule.expr.replace('"bytes":0,"packets":0', '"bytes":60,"packets":1')
    assert counted != rule.expr
    assert nf.same_rule(rule, NftRule(**{**vars(rule), "expr": counted}))
    assert not nf.same_rule(rule, NftRule(**{**vars(rule), "table_handle": 8}))
    assert not nf.same_rule(rule, NftRule(**{**vars(rule), "comment": None}))
    assert not nf.same_rule(
        rule, NftRule(**{**vars(rule), "expr": rule.expr.replace("eth0", "lo")})
    )


def test_replacements_carry_the_counters_the_rule_has_now() -> None:
    rewrite = sample_change().rewrites[0]
    now = NftRule(**{**vars(rewrite.before), "expr": rewrite.before.expr.replace(":0", ":9")})
    obj = nf._rule_object(rewrite.after, now)
    assert obj["expr"][1] == {"counter": {"bytes": 9, "packets": 9}}
    assert obj["comment"] == 'say "hi"' and obj["handle"] == 4
    quota = {"quota": {"val": 100, "val_unit": "mbytes"}}
    used = {"quota": {"val": 100, "val_unit": "mbytes", "used": 5, "used_unit": "kbytes"}}
    assert nf._with_state(quota, used) == used
    assert nf._with_state(used, None) == quota


LEGACY_SAVE = """# Generated by iptables-save v1.8.9
*filter
:INPUT DROP [0:0]
-A INPUT -i lo -j ACCEPT
-A INPUT -i eth0 -p tcp -m tcp --dport 22 -j ACCEPT
-A INPUT -m comment --comment "not -i eth0 at all" -j ACCEPT
COMMIT
*nat
-A POSTROUTING ! -o eth+ -j MASQUERADE
-A POSTROUTING -o br0 -j MASQUERADE
COMMIT
"""


def test_legacy_iptables_rules_naming_the_nic_are_found() -> None:
    hits = [
        (table, line)
        for table, line in nf._saved_rules(LEGACY_SAVE)
        if nf._names_interface(line, "eth0")
    ]
    assert hits == [  # a rule naming only br0 is left alone
        ("filter", "-A INPUT -i eth0 -p tcp -m tcp --dport 22 -j ACCEPT"),
        ("nat", "-A POSTROUTING ! -o eth+ -j MASQUERADE"),
    ]


NAMES = st.sampled_from(["eth0", "eth1", "lo", "wlan0"]) | st.text(
    "abehrt0", min_size=1, max_size=15
)


@given(st.lists(NAMES, min_size=1, max_size=6))
def test_renaming_there_and_back_is_the_identity(names: list[str]) -> None:
    names = [n for n in names if n != "br0"]
    rule = NftRule(
        "inet",
        "filter",
        1,
        "input",
        4,
        nf.canonical([match(meta("iifname"), {"set": [*names, "eth0"]}), ACCEPT]),
        None,
    )
    there = nf.rewrite_rule(rule, "eth0", "br0")
    assert not nf.names_device(there.statements, "eth0")
    assert nf.rewrite_rule(there, "br0", "eth0") == rule
