"""Netfilter rules that name the NIC: read, rewrite onto the bridge in one nftables transaction,
and undo.

Once the NIC is a port of the bridge, packets reach the ip, ip6, inet (and arp) hooks with the
bridge as their input device, so `iifname "eth0" tcp dport 22 accept` under a drop policy stops
matching and SSH is cut; the NIC's drop rules silently stop dropping. The bridge and netdev
families still see the port and keep their meaning: they are left alone.

Everything goes through the nftables JSON API of libnftables (the library `nft` is built on),
loaded in process with ctypes: no text is parsed or edited.

- Reading: one `list ruleset`. A rule is rewritable when every place it names the NIC is the
  value compared with `meta iifname/oifname/iif/oif` (or a `fib ... oif/oifname` result): a
  plain value, an element of an anonymous set, a component of a concatenation, or a key of an
  anonymous verdict map. Anything else naming the NIC is a blocker (named sets and maps,
  wildcards like "eth*", flowtables, iptables-nft rules with xtables matches, legacy iptables).
- `iif`/`oif` compare an interface index; nftables resolves the name at the time the rule is
  written. The bridge exists when the takeover runs the transaction, and the NIC keeps its index
  throughout, so `iif "eth0"` -> `iif "br0"` and back is exact: the restored rule lists as
  `iif "eth0"` again, which nftables renders from the stored index. (The rollback must run the
  inverse BEFORE it deletes the bridge: a rule naming a deleted device lists as a bare number.)
- Handles: `replace rule ... handle N` keeps N (the kernel swaps the rule in place, same
  position, same handle; verified on 6.18 with the echo output, which the result records anyway).
  The inverse is the same replacement with the original expression, so the restored ruleset is
  identical, handles included. Rule counters are carried both ways.
- Guard: nftables has no compare-and-swap for rule content (libnftables sends the ruleset
  generation id with a batch, but replays the batch on a mismatch). A replacement keeps the
  handle, so a handle alone proves nothing; a table recreated under the same name gets a new
  table handle. So just before sending, apply_change reads the ruleset again and requires every
  rule at its (family, table, table handle, chain, handle) to carry the expression and comment
  it was planned from (counters aside), and, going forward, that no other rule names the NIC.
  What remains is the ~1 ms between that read and the transaction; a rule whose handle is gone
  by then makes the whole transaction fail in the kernel.
- Cost (2 cores, kernel 6.18, nftables 1.0.6): loading the library ~0.9 ms once; reading an empty
  ruleset ~0.1 ms, 50 rules ~4 ms. A transaction takes ~15 ms whatever its size (the same with
  `nft -f`): the kernel's commit; the new rules take effect at once within it.
- Because the handles stay, the planned change is already its own undo record: store it before
  sending, and `undo_change(planned)` is right whether or not the transaction happened.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from . import serde

Json = Any  # a value decoded from the nftables JSON API

LIBRARY = "libnftables.so.1"
_OUTPUT_HANDLE = 1 << 3  # NFT_CTX_OUTPUT_HANDLE
_OUTPUT_JSON = 1 << 4  # NFT_CTX_OUTPUT_JSON: JSON out, and JSON accepted in
_OUTPUT_ECHO = 1 << 5  # NFT_CTX_OUTPUT_ECHO: a command's objects come back with their handles

# Families whose hooks see the bridge, not its port, as the device of a packet from the NIC.
REWRITTEN_FAMILIES = ("ip", "ip6", "inet", "arp")
_NAME_KEYS = ("iifname", "oifname")
_INDEX_KEYS = ("iif", "oif")
_STATEFUL = {"counter": ("packets", "bytes"), "quota": ("used", "used_unit")}
_LEGACY_TIMEOUT = 5.0


class NftError(Exception):
    """libnftables refused a command; the message is its error text."""


# --- records -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NftRule:
    family: str
    table: str
    table_handle: int  # a table recreated under the same name gets a new handle
    chain: str
    handle: int
    expr: str  # the rule's "expr" list, canonical JSON (sorted keys, no spaces)
    comment: str | None

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.family, self.table, self.chain, self.handle)

    @property
    def statements(self) -> list[Json]:
        statements: list[Json] = json.loads(self.expr)
        return statements

    @property
    def where(self) -> str:
        return f"{self.family} {self.table} {self.chain} handle {self.handle}"

    @property
    def text(self) -> str:
        comment = f" comment {_quote(self.comment)}" if self.comment is not None else ""
        return render(self.statements) + comment

    def __str__(self) -> str:
        return f"{self.where}: {self.text}"


@dataclass(frozen=True)
class NftRules:
    """The rules naming the NIC that can be rewritten, and what refuses the takeover."""

    rules: tuple[NftRule, ...]
    blockers: tuple[str, ...]
    note: str = ""  # why nothing could be read (no libnftables, no nf_tables, not root)


@dataclass(frozen=True)
class NftRewrite:
    before: NftRule
    after: NftRule

    def inverse(self) -> NftRewrite:
        return NftRewrite(self.after, self.before)

    def __str__(self) -> str:
        return f"{self.before.where}: {self.before.text} -> {self.after.text}"


@dataclass(frozen=True)
class NftChange:
    """Rule replacements sent as one nftables transaction: `old` renamed to `new`."""

    old: str
    new: str
    rewrites: tuple[NftRewrite, ...]

    def inverse(self) -> NftChange:
        return NftChange(self.new, self.old, tuple(r.inverse() for r in self.rewrites))

    def __str__(self) -> str:
        return "\n".join(f"replace rule {r}" for r in self.rewrites)


@dataclass(frozen=True)
class NftResult:
    ok: bool
    error: str  # libnftables' error text, or why the change was refused before sending
    applied: NftChange  # what the kernel now has (handles from its echo); undo_change takes it


# --- libnftables -------------------------------------------------------------------------------


@functools.cache
def _library() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(LIBRARY)
    except OSError:
        return None
    ptr, text = ctypes.c_void_p, ctypes.c_char_p
    lib.nft_ctx_new.restype = ptr
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_free.argtypes = [ptr]
    lib.nft_ctx_output_set_flags.argtypes = [ptr, ctypes.c_uint]
    lib.nft_ctx_buffer_output.argtypes = [ptr]
    lib.nft_ctx_buffer_error.argtypes = [ptr]
    lib.nft_ctx_get_output_buffer.argtypes = [ptr]
    lib.nft_ctx_get_output_buffer.restype = text
    lib.nft_ctx_get_error_buffer.argtypes = [ptr]
    lib.nft_ctx_get_error_buffer.restype = text
    lib.nft_run_cmd_from_buffer.argtypes = [ptr, text]
    lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
    return lib


def available() -> bool:
    return _library() is not None


def nft(command: str, *, echo: bool = False) -> Json:
    """Run one nftables command (text or a JSON document) in a fresh context; its JSON output.

    A fresh context per call: a context caches the ruleset, and a stale cache is what the guard
    must not see.
    """
    lib = _library()
    if lib is None:
        raise NftError(f"{LIBRARY} not found (Debian package libnftables1)")
    ctx = lib.nft_ctx_new(0)
    try:
        flags = _OUTPUT_JSON | _OUTPUT_HANDLE | (_OUTPUT_ECHO if echo else 0)
        lib.nft_ctx_output_set_flags(ctx, flags)
        lib.nft_ctx_buffer_output(ctx)
        lib.nft_ctx_buffer_error(ctx)
        rc = lib.nft_run_cmd_from_buffer(ctx, command.encode())
        out: bytes = lib.nft_ctx_get_output_buffer(ctx) or b""
        err: bytes = lib.nft_ctx_get_error_buffer(ctx) or b""
    finally:
        lib.nft_ctx_free(ctx)
    if rc != 0:
        raise NftError(" ".join(err.decode(errors="replace").split()) or f"nft failed ({rc})")
    return json.loads(out) if out.strip() else None


def list_ruleset() -> list[Json]:
    """The ruleset as the JSON API's list of objects (metainfo, table, chain, set, rule ...)."""
    doc = nft("list ruleset")
    return list(doc["nftables"]) if doc else []


# --- reading -----------------------------------------------------------------------------------


def read_nic_rules(nic: str, bridge: str = "br0") -> NftRules:
    """The rules naming `nic` in the families that see the bridge instead, and the blockers.

    A rule that names `bridge` only is left as it is: an admin may have written it for after
    the takeover. One that names both cannot be rewritten without merging the two: a blocker.
    """
    return _read(nic, bridge, renamed=False)


def read_rules(nic: str, bridge: str) -> NftRules:
    """`read_nic_rules`, plus the rewritable rules that name the bridge instead (what a
    takeover made of them), so that a host can be compared before and after: one listing."""
    return _read(nic, bridge, renamed=True)


def _read(nic: str, bridge: str, *, renamed: bool) -> NftRules:
    if not _net_admin():  # libnftables would also print "you must be root" on stderr
        return NftRules((), (), "netfilter rules not read: needs root (CAP_NET_ADMIN)")
    legacy = tuple(legacy_iptables_blockers(nic, bridge))
    if not available():
        blockers = (*legacy, *_iptables_nft_without_library(nic, bridge))
        return NftRules((), blockers, f"{LIBRARY} not installed: nftables rules not read")
    try:
        objects = list_ruleset()
    except NftError as e:
        return _unreadable(str(e), legacy)
    found = classify(objects, nic, bridge)
    rules = (*found.rules, *classify(objects, bridge, nic).rules) if renamed else found.rules
    return NftRules(rules, (*found.blockers, *legacy), found.note)


_CAP_NET_ADMIN = 12


def _net_admin() -> bool:
    """Whether this process has CAP_NET_ADMIN, which reading the ruleset takes."""
    try:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("CapEff:"))
    except (OSError, StopIteration):
        return os.geteuid() == 0
    return bool(int(line.split()[1], 16) >> _CAP_NET_ADMIN & 1)


def _unreadable(error: str, legacy: tuple[str, ...]) -> NftRules:
    if "Protocol not supported" in error:  # the kernel has no nf_tables: no rules either
        return NftRules((), legacy, f"no nf_tables in this kernel: {error}")
    return NftRules((), (*legacy, f"cannot read the nftables ruleset: {error}"))


def classify(objects: list[Json], nic: str, bridge: str) -> NftRules:
    """Pure: sort a `list ruleset` JSON object list into rewritable rules and blockers."""
    tables = {(t["family"], t["name"]): t["handle"] for t in _objects(objects, "table")}
    rules: list[NftRule] = []
    blockers: list[str] = []
    for obj in _objects(objects, "rule"):
        if obj["family"] not in REWRITTEN_FAMILIES:
            continue
        rule = _rule(obj, tables[(obj["family"], obj["table"])])
        if not _may_name(rule.expr, nic, bridge):
            continue  # most rules: skip the walk
        problems = rule_problems(rule, nic, bridge)
        if problems:
            blockers.extend(f"{rule}: {p}" for p in problems)
        elif names_device(rule.statements, nic):
            rules.append(rule)
    blockers.extend(set_blockers(objects, nic, bridge))
    blockers.extend(flowtable_blockers(objects, nic))
    return NftRules(tuple(rules), tuple(blockers))


def _objects(objects: list[Json], kind: str) -> Iterator[Json]:
    return (o[kind] for o in objects if kind in o)


def _rule(obj: Json, table_handle: int) -> NftRule:
    return NftRule(
        family=obj["family"],
        table=obj["table"],
        table_handle=table_handle,
        chain=obj["chain"],
        handle=obj["handle"],
        expr=canonical(obj["expr"]),
        comment=obj.get("comment"),
    )


def _may_name(expr: str, *names: str) -> bool:
    """Whether canonical JSON could name one of `names`, exactly or by a wildcard."""
    return '*"' in expr or any(json.dumps(n) in expr for n in names)


def canonical(value: Json) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def rule_problems(rule: NftRule, nic: str, bridge: str) -> list[str]:
    """Why this rule cannot be rewritten exactly ([] if it can, or does not name the NIC)."""
    rewriter = _Rewriter(nic, bridge)
    rewritten = rewriter.statements(rule.statements)
    problems = rewriter.problems
    if rewriter.hits and rewriter.names_new:
        problems.append(
            f'names both "{nic}" and "{bridge}": renamed, the two would be one; '
            "merge them by hand first"
        )
    if not problems and names_device(rewritten, nic):
        problems.append(
            f'names "{nic}" outside an interface match this tool can rewrite: '
            f'change it to "{bridge}" by hand'
        )
    if (problems or rewriter.hits) and _has_xt(rule.statements):
        problems.append(
            "made by iptables-nft with an xtables match that nftables cannot write back: "
            f"change it with iptables-nft (-i/-o {bridge}) by hand"
        )
    return problems


def names_device(value: Json, name: str) -> bool:
    """Whether `name` appears as a string anywhere in a JSON value."""
    if isinstance(value, str):
        return value == name
    if isinstance(value, list):
        return any(names_device(v, name) for v in value)
    if isinstance(value, dict):
        return any(names_device(v, name) for v in value.values())
    return False


def _has_xt(statements: list[Json]) -> bool:
    return any(isinstance(s, dict) and "xt" in s for s in statements)


def set_blockers(objects: list[Json], nic: str, bridge: str) -> Iterator[str]:
    """Named sets and maps holding the NIC (or a wildcard for it): their users cannot be
    rewritten one by one, and other rules may use them too."""
    for kind in ("set", "map"):
        for s in _objects(objects, kind):
            if s["family"] not in REWRITTEN_FAMILIES:
                continue
            if _elements_name(s.get("elem", []), nic):
                yield (
                    f'{s["family"]} {s["table"]}: named {kind} {s["name"]} matches "{nic}"'
                    f"{_set_users(objects, s)}: add {bridge} to it and remove {nic} by hand, "
                    "or use an anonymous set in the rules"
                )


def _elements_name(elements: Json, nic: str) -> bool:
    return names_device(elements, nic) or any(
        isinstance(s, str) and _wildcard_matches(s, nic) for s in _strings(elements)
    )


def _strings(value: Json) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)


def _set_users(objects: list[Json], s: Json) -> str:
    ref = "@" + s["name"]
    users = [
        f"{r['chain']} handle {r['handle']}"
        for r in _objects(objects, "rule")
        if (r["family"], r["table"]) == (s["family"], s["table"]) and names_device(r["expr"], ref)
    ]
    return f" (used by {', '.join(users)})" if users else ""


def flowtable_blockers(objects: list[Json], nic: str) -> Iterator[str]:
    for f in _objects(objects, "flowtable"):
        devices = f.get("dev", [])
        if f["family"] in REWRITTEN_FAMILIES and nic in (
            [devices] if isinstance(devices, str) else devices
        ):
            yield (
                f"{f['family']} {f['table']}: flowtable {f['name']} handle {f['handle']} "
                f"offloads {nic}: once {nic} is a bridge port its flows take another path; "
                "remove it from the flowtable by hand"
            )


# --- rewriting (pure) --------------------------------------------------------------------------


def _wildcard_matches(pattern: str, name: str) -> bool:
    return pattern.endswith("*") and not pattern.endswith("\\*") and name.startswith(pattern[:-1])


def _interface_key(expr: Json) -> str | None:
    """The key if `expr` yields an interface (name or index), else None."""
    if not isinstance(expr, dict):
        return None
    if "meta" in expr and expr["meta"].get("key") in (*_NAME_KEYS, *_INDEX_KEYS):
        key: str = expr["meta"]["key"]
        return key
    if "fib" in expr and expr["fib"].get("result") in ("oif", "oifname"):
        result: str = expr["fib"]["result"]
        return result
    return None


def interface_keys(left: Json) -> list[str | None]:
    """Per component of a compared expression, the interface key it is (None for the others);
    [] if it compares no interface."""
    if isinstance(left, dict) and "concat" in left:
        keys = [_interface_key(c) for c in left["concat"]]
        return keys if any(keys) else []
    key = _interface_key(left)
    return [key] if key else []


class _Rewriter:
    """Walks a rule's statements and renames `old` to `new` where an interface is compared.

    `problems` collects what cannot be renamed exactly; `hits` counts the renamed places.
    """

    def __init__(self, old: str, new: str) -> None:
        self.old, self.new = old, new
        self.hits = 0
        self.names_new = False
        self.problems: list[str] = []

    def statements(self, statements: list[Json]) -> list[Json]:
        return [self.node(s) for s in statements]

    def node(self, node: Json) -> Json:
        if isinstance(node, list):
            return [self.node(n) for n in node]
        if not isinstance(node, dict):
            return node
        if "match" in node:
            return {**node, "match": self.match(node["match"])}
        if "vmap" in node or "map" in node:
            kind = "vmap" if "vmap" in node else "map"
            return {**node, kind: self.mapping(node[kind])}
        return {k: self.node(v) for k, v in node.items()}

    def match(self, match: Json) -> Json:
        keys = interface_keys(match["left"])
        if not keys:
            return {**match, "right": self.node(match["right"])}
        return {**match, "right": self.value(match["right"], keys)}

    def mapping(self, mapping: Json) -> Json:
        keys = interface_keys(mapping["key"])
        data = mapping["data"]
        if keys and isinstance(data, dict) and "set" in data:
            pairs = [[self.value(k, keys), self.node(v)] for k, v in data["set"]]
            return {**mapping, "data": {**data, "set": pairs}}
        return {k: self.node(v) for k, v in mapping.items()}

    def value(self, value: Json, keys: list[str | None]) -> Json:
        if isinstance(value, dict) and "set" in value:
            return {**value, "set": [self.value(v, keys) for v in value["set"]]}
        if isinstance(value, dict) and "elem" in value:
            return {
                **value,
                "elem": {**value["elem"], "val": self.value(value["elem"]["val"], keys)},
            }
        if len(keys) > 1 and isinstance(value, dict) and "concat" in value:
            parts = zip(value["concat"], keys, strict=True)
            return {**value, "concat": [self.scalar(v, k) if k else v for v, k in parts]}
        if len(keys) == 1 and keys[0]:
            return self.scalar(value, keys[0])
        return self.node(value)

    def scalar(self, value: Json, key: str) -> Json:
        if not isinstance(value, str):
            return value
        if value == self.old:
            self.hits += 1
            return self.new
        if value == self.new:
            self.names_new = True
        elif key in _NAME_KEYS and _wildcard_matches(value, self.old):
            self.problems.append(
                f'the wildcard "{value}" matches "{self.old}": rewriting it would change what '
                f'else it matches; split it by hand (e.g. add a rule for "{self.new}")'
            )
        elif value.startswith("@"):
            pass  # a named set: set_blockers() looks at its elements
        return value


def rewrite_rule(rule: NftRule, old: str, new: str) -> NftRule:
    rewriter = _Rewriter(old, new)
    statements = rewriter.statements(rule.statements)
    if rewriter.problems:
        raise ValueError(f"{rule}: {'; '.join(rewriter.problems)}")
    return replace(rule, expr=canonical(statements))


def plan_rewrite(rules: NftRules, nic: str, bridge: str) -> NftChange:
    """Pure: every rule renamed from `nic` to `bridge`. Refuse blockers before calling this."""
    if rules.blockers:
        raise ValueError("netfilter rules block the takeover: " + "; ".join(rules.blockers))
    rewrites = tuple(NftRewrite(r, rewrite_rule(r, nic, bridge)) for r in rules.rules)
    return NftChange(nic, bridge, rewrites)


# --- applying ----------------------------------------------------------------------------------


def apply_change(change: NftChange) -> NftResult:
    """Send every replacement as one transaction, if the ruleset is still as planned.

    Going forward, also refuse if any other rule names the NIC now. Nothing is changed on a
    refusal or an error: the transaction is all or nothing.
    """
    if not change.rewrites:
        return NftResult(True, "", change)
    return _transaction(change, strict=True)


def undo_change(applied: NftChange) -> NftResult:
    """Put back the rules `apply_change` replaced (its result's `applied`).

    Idempotent: a rule already back as it was is skipped, so a rollback may run again after a
    crash. Run it while the bridge still exists (see the module docstring).
    """
    if not applied.rewrites:
        return NftResult(True, "", applied)
    return _transaction(applied.inverse(), strict=False)


def _transaction(change: NftChange, strict: bool) -> NftResult:
    empty = NftChange(change.old, change.new, ())
    try:
        objects = list_ruleset()
        current = _current_rules(objects)
        todo, problems = _pending(change, current)
        if strict:
            problems += _scope_problems(change, objects)
        if problems:
            return NftResult(
                False, "ruleset changed since it was read: " + "; ".join(problems), empty
            )
        if not todo:
            return NftResult(True, "", empty)
        commands = [
            {"replace": {"rule": _rule_object(r.after, current[r.before.key])}} for r in todo
        ]
        echoed = nft(json.dumps({"nftables": commands}), echo=True)
    except NftError as e:
        return NftResult(False, str(e), empty)
    return NftResult(True, "", NftChange(change.old, change.new, _echoed(todo, echoed)))


def _current_rules(objects: list[Json]) -> dict[tuple[str, str, str, int], NftRule]:
    tables = {(t["family"], t["name"]): t["handle"] for t in _objects(objects, "table")}
    rules = (_rule(r, tables[(r["family"], r["table"])]) for r in _objects(objects, "rule"))
    return {r.key: r for r in rules}


def _pending(
    change: NftChange, current: dict[tuple[str, str, str, int], NftRule]
) -> tuple[list[NftRewrite], list[str]]:
    """The rewrites still to send; the rules that are neither as planned nor already done."""
    todo: list[NftRewrite] = []
    problems: list[str] = []
    for rewrite in change.rewrites:
        now = current.get(rewrite.before.key)
        if now is not None and same_rule(now, rewrite.before):
            todo.append(rewrite)
        elif now is not None and same_rule(now, rewrite.after):
            continue
        elif now is None:
            problems.append(f"{rewrite.before.where} is gone")
        else:
            problems.append(f"{rewrite.before.where} is now: {now.text}")
    return todo, problems


def _scope_problems(change: NftChange, objects: list[Json]) -> list[str]:
    found = classify(objects, change.old, change.new)
    planned = {r.before.key for r in change.rewrites}
    extra = [f"new rule naming {change.old}: {r}" for r in found.rules if r.key not in planned]
    return [*found.blockers, *extra]


def same_rule(a: NftRule, b: NftRule) -> bool:
    """Same place, same table incarnation, same expression and comment, counters aside."""
    return (
        a.key == b.key
        and a.table_handle == b.table_handle
        and a.comment == b.comment
        and _stateless(a.statements) == _stateless(b.statements)
    )


def _stateless(statements: list[Json]) -> list[Json]:
    return [_with_state(s, None) for s in statements]


def _with_state(statement: Json, source: Json) -> Json:
    """`statement` with the counter/quota values of `source` (without any if None)."""
    if not isinstance(statement, dict):
        return statement
    for kind, fields in _STATEFUL.items():
        body = statement.get(kind)
        if isinstance(body, dict):
            src = source.get(kind) if isinstance(source, dict) else None
            state = {f: v for f, v in src.items() if f in fields} if isinstance(src, dict) else {}
            rest = {f: v for f, v in body.items() if f not in fields}
            return {**statement, kind: {**rest, **state}}
    return statement


def _rule_object(rule: NftRule, now: NftRule) -> Json:
    """The JSON rule for a replacement, carrying the counters the rule has now."""
    expr = [_with_state(s, c) for s, c in zip(rule.statements, now.statements, strict=True)]
    obj = {
        "family": rule.family,
        "table": rule.table,
        "chain": rule.chain,
        "handle": rule.handle,
        "expr": expr,
    }
    return obj if rule.comment is None else {**obj, "comment": rule.comment}


def _echoed(todo: list[NftRewrite], echoed: Json) -> tuple[NftRewrite, ...]:
    """The rewrites with the handles the kernel gave the new rules (it keeps them, in fact)."""
    replies = [o["replace"] for o in (echoed or {}).get("nftables", []) if "replace" in o]
    if len(replies) != len(todo):
        return tuple(todo)  # no echo to read: replace keeps the handle
    handles = [r.get("handle", r["rule"].get("handle")) for r in replies]
    return tuple(
        NftRewrite(r.before, replace(r.after, handle=h if isinstance(h, int) else r.after.handle))
        for r, h in zip(todo, handles, strict=True)
    )


# --- iptables ------------------------------------------------------------------------------------


def legacy_iptables_blockers(nic: str, bridge: str) -> Iterator[str]:
    """Rules of iptables-legacy (x_tables, no nftables API) naming the NIC."""
    for proc, save in (("ip_tables_names", "iptables"), ("ip6_tables_names", "ip6tables")):
        if _proc_tables(proc):
            yield from _saved_rule_blockers(f"{save}-legacy-save", nic, bridge, "iptables-legacy")


def _iptables_nft_without_library(nic: str, bridge: str) -> Iterator[str]:
    for save in ("iptables-nft-save", "ip6tables-nft-save"):
        if shutil.which(save, path=_SBIN_PATH) is not None:
            yield from _saved_rule_blockers(save, nic, bridge, f"iptables-nft ({LIBRARY} missing)")


_SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _proc_tables(name: str) -> bool:
    try:
        with open(f"/proc/net/{name}") as f:
            return bool(f.read().strip())
    except OSError:
        return False


def _saved_rule_blockers(save: str, nic: str, bridge: str, what: str) -> Iterator[str]:
    path = shutil.which(save, path=_SBIN_PATH)
    if path is None:
        yield f"{what} tables exist but {save} is not installed: cannot check them for {nic}"
        return
    done = subprocess.run(
        [path], capture_output=True, text=True, timeout=_LEGACY_TIMEOUT, check=False
    )
    if done.returncode != 0:
        yield f"{save} failed: {done.stderr.strip()}"
        return
    for table, line in _saved_rules(done.stdout):
        if _names_interface(line, nic):
            yield (
                f"{what} rule in table {table} names {nic}: {line}: "
                f"migrate the rule to {bridge} by hand or to nftables"
            )


def _saved_rules(text: str) -> Iterator[tuple[str, str]]:
    table = "?"
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith("-A "):
            yield table, line


def _names_interface(line: str, nic: str) -> bool:
    try:
        words = shlex.split(line)
    except ValueError:
        words = line.split()
    flags = ("-i", "-o", "--in-interface", "--out-interface")
    values = [b for a, b in itertools.pairwise(words) if a in flags]
    return any(v == nic or _plus_matches(v, nic) for v in values)


def _plus_matches(value: str, *names: str) -> bool:
    return value.endswith("+") and any(n.startswith(value[:-1]) for n in names)


# --- rendering -----------------------------------------------------------------------------------


def render(statements: list[Json]) -> str:
    """nft-like text of a rule's statements, for `plan`: readable, not for parsing back."""
    return " ".join(_statement(s) for s in statements)


def _quote(text: str) -> str:
    return '"' + text.replace('"', '\\"') + '"'


def _statement(s: Json) -> str:
    if not isinstance(s, dict) or len(s) != 1:
        return canonical(s)
    ((kind, body),) = s.items()
    if kind == "match":
        op = "" if body["op"] in ("==", "in") else body["op"] + " "
        right = _compared(body["right"], interface_keys(body["left"]))
        return f"{_expr(body['left'])} {op}{right}"
    if body is None:
        return str(kind)  # accept, drop, continue, return
    if kind == "xt" and isinstance(body, dict):
        return f"xt {body.get('type')} {body.get('name')}"
    if kind in ("jump", "goto"):
        return f"{kind} {body['target']}"
    if kind == "counter" and isinstance(body, dict):
        return f"counter packets {body.get('packets', 0)} bytes {body.get('bytes', 0)}"
    if kind == "quota" and isinstance(body, dict):
        return f"quota {body.get('val')} {body.get('val_unit', 'bytes')}"
    if kind in ("limit", "log") and isinstance(body, dict):
        return " ".join([kind, *(f"{k} {_expr(v)}" for k, v in body.items())])
    if kind in ("vmap", "map"):
        data = _compared(body["data"], interface_keys(body["key"]))
        return f"{_expr(body['key'])} {kind} {data}"
    return f"{kind} {_expr(body)}"


def _compared(value: Json, keys: list[str | None]) -> str:
    """A compared value, interface names quoted as nft prints them."""
    if isinstance(value, dict) and "set" in value:
        items = [_compared_item(v, keys) for v in value["set"]]
        return "{ " + ", ".join(items) + " }"
    if isinstance(value, dict) and "elem" in value:
        return _compared(value["elem"]["val"], keys)
    if len(keys) > 1 and isinstance(value, dict) and "concat" in value:
        parts = zip(value["concat"], keys, strict=True)
        return " . ".join(_compared(v, [k]) for v, k in parts)
    if len(keys) == 1 and keys[0] and isinstance(value, str) and not value.startswith("@"):
        return _quote(value)
    return _expr(value)


def _compared_item(item: Json, keys: list[str | None]) -> str:
    if isinstance(item, list):  # a map element: key, data
        return f"{_compared(item[0], keys)} : {_expr(item[1])}"
    return _compared(item, keys)


def _expr(e: Json) -> str:
    if isinstance(e, str):
        return e
    if isinstance(e, list):
        return " ".join(_expr(v) for v in e)
    if not isinstance(e, dict) or len(e) != 1:
        return canonical(e)
    ((kind, body),) = e.items()
    if body is None:
        return str(kind)  # a verdict in a map
    render_kind = _EXPRS.get(kind, lambda b: f"{kind} {canonical(b)}")
    return render_kind(body)


def _set(body: Json) -> str:
    items = [" : ".join(_expr(x) for x in v) if isinstance(v, list) else _expr(v) for v in body]
    return "{ " + ", ".join(items) + " }"


_EXPRS: dict[str, Callable[[Json], str]] = {
    "meta": lambda b: b["key"] if b["key"] in (*_NAME_KEYS, *_INDEX_KEYS) else f"meta {b['key']}",
    "payload": lambda b: (
        f"{b.get('protocol', '@' + str(b.get('base')))} {b.get('field', '')}".strip()
    ),
    "ct": lambda b: f"ct {b['key']}",
    "fib": lambda b: f"fib {' . '.join(b.get('flags', []))} {b['result']}",
    "set": _set,
    "concat": lambda b: " . ".join(_expr(v) for v in b),
    "prefix": lambda b: f"{_expr(b['addr'])}/{b['len']}",
    "range": lambda b: f"{_expr(b[0])}-{_expr(b[1])}",
    "elem": lambda b: _expr(b["val"]),
}


# --- command line (tests run it inside a namespace; also handy to look at a host) ---------------


def main(argv: list[str]) -> int:
    """`read NIC [BRIDGE]` prints NftRules as JSON, `show NIC [BRIDGE]` the plan as text;
    `apply` and `undo` take an NftChange as JSON on stdin and print the NftResult as JSON."""
    command, args = argv[0], argv[1:]
    if command == "read":
        print(json.dumps(serde.to_data(read_nic_rules(*args))))
    elif command == "show":
        print(_show(read_nic_rules(*args), *args[:1], *(args[1:2] or ["br0"])))
    elif command in ("apply", "undo"):
        change = serde.load(NftChange, json.load(sys.stdin))
        result = apply_change(change) if command == "apply" else undo_change(change)
        print(json.dumps(serde.to_data(result)))
    else:
        raise SystemExit(f"unknown command {command!r}: read, show, apply or undo")
    return 0


def _show(rules: NftRules, nic: str, bridge: str) -> str:
    if rules.blockers:
        return "\n".join(f"refused: {b}" for b in rules.blockers)
    lines = [rules.note] if rules.note else []
    return "\n".join([*lines, str(plan_rewrite(rules, nic, bridge))])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
