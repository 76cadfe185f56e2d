"""systemd's INI dialect (networkd's .network and .netdev files), as much as a hand-over needs:
sections in order, each with its lines (keys may repeat, order matters), comments dropped."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Section:
    name: str
    lines: tuple[tuple[str, str], ...]  # (key, value), in order

    def values(self, key: str) -> tuple[str, ...]:
        return tuple(v for k, v in self.lines if k == key)

    def with_line(self, key: str, value: str) -> Section:
        return Section(self.name, (*self.lines, (key, value)))


class UnitFileError(ValueError):
    pass


def parse(text: str) -> tuple[Section, ...]:
    sections: list[Section] = []
    for n, raw in enumerate(_joined(text.splitlines()), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            sections.append(Section(line[1:-1], ()))
        elif "=" in line and sections:
            key, value = line.split("=", 1)
            sections[-1] = sections[-1].with_line(key.strip(), value.strip())
        else:
            raise UnitFileError(f"line {n}: {raw!r} is neither a section nor a key=value")
    return tuple(sections)


def render(sections: Iterable[Section], header: str = "") -> str:
    blocks = [
        "\n".join([f"[{s.name}]", *(f"{k}={v}" for k, v in s.lines)]) + "\n" for s in sections
    ]
    return header + "\n".join(blocks)


def named(sections: Iterable[Section], name: str) -> tuple[Section, ...]:
    return tuple(s for s in sections if s.name == name)


def _joined(lines: list[str]) -> list[str]:
    """Continuation lines (a trailing backslash) joined, as systemd reads them."""
    out: list[str] = []
    pending = ""
    for line in lines:
        if line.endswith("\\") and not line.lstrip().startswith(("#", ";")):
            pending += line[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    if pending:
        out.append(pending)
    return out
