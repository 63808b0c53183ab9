"""Ignore rules: ``.gitignore`` and ``.syncignore`` files, gitignore syntax.

Each folder's rule files apply to paths below that folder; later rules win and ``!pattern``
re-includes. Like git, an ignored folder is pruned whole, so nothing below it can be re-included.
``.git`` itself is always ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ALWAYS_IGNORED", "IGNORE_FILES", "IgnoreRules", "Rule", "parse_rules"]

IGNORE_FILES = (".gitignore", ".syncignore")
ALWAYS_IGNORED = frozenset({".git"})


@dataclass(frozen=True, slots=True)
class Rule:
    base: str  # folder holding the rule file, relative to the root ("" for the root)
    regex: re.Pattern[str]
    negate: bool
    dir_only: bool
    anchored: bool  # pattern has a slash: matched against the path, else against the name


def _translate(glob: str) -> str:
    out = []
    i = 0
    while i < len(glob):
        c = glob[i]
        if glob.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if glob.startswith("/**", i) and i + 3 == len(glob):
            out.append("(?:/.*)?")
            i += 3
            continue
        if glob.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = glob.find("]", i + 1)
            if end == -1:
                out.append(re.escape(c))
            else:
                body = glob[i + 1 : end].replace("\\", "\\\\")
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = end
        elif c == "\\" and i + 1 < len(glob):
            i += 1
            out.append(re.escape(glob[i]))
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def parse_rules(text: str, base: str = "") -> list[Rule]:
    rules = []
    for raw in text.splitlines():
        line = raw.rstrip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        if negate:
            line = line[1:]
        if line.startswith("\\"):
            line = line[1:]
        dir_only = line.endswith("/")
        line = line.rstrip("/")
        if not line:
            continue
        anchored = "/" in line
        line = line.lstrip("/")
        regex = re.compile(f"^{_translate(line)}$")
        rules.append(Rule(base, regex, negate, dir_only, anchored))
    return rules


class IgnoreRules:
    """Accumulates rule files while walking down; :meth:`ignored` answers for one path."""

    def __init__(self, rules: list[Rule] | None = None) -> None:
        self.rules: list[Rule] = list(rules or [])

    def load_folder(self, root: Path, rel: str) -> IgnoreRules:
        """Rules that apply inside folder ``rel``: ours plus its own rule files, if any."""
        extra: list[Rule] = []
        for name in IGNORE_FILES:
            p = root / rel / name
            if p.is_file():
                extra += parse_rules(p.read_text(errors="replace"), rel)
        return IgnoreRules(self.rules + extra) if extra else self

    def ignored(self, rel: str, is_dir: bool) -> bool:
        name = rel.rsplit("/", 1)[-1]
        if name in ALWAYS_IGNORED:
            return True
        verdict = False
        for rule in self.rules:
            if rule.dir_only and not is_dir:
                continue
            if rule.base:
                if not rel.startswith(rule.base + "/"):
                    continue
                sub = rel[len(rule.base) + 1 :]
            else:
                sub = rel
            target = sub if rule.anchored else name
            if rule.regex.match(target):
                verdict = not rule.negate
        return verdict
