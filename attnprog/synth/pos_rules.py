"""Coarse POS tags from spaCy's attribute-ruler rules, without running its Matcher.

English spaCy pipelines tag tokens with fine-grained tags (``tag_``) and then let an attribute
ruler set the coarse ``pos_`` by rules on the tag, the lower-cased word and the dependency
label. Causal syntax parses one prefix per token, so that ruler (a Matcher over every prefix)
costs as much as tagging and parsing together. Here its POS-setting rules are compiled into
lookups and applied to the parsed tokens; the result is the ruler's, rule for rule: every rule
that matches a token is applied in order, so the last one wins, as in spaCy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

# a parsed token as the rules read it: (tag_, lower_, dep_, is_space)
Token = tuple[str, str, str, bool]
_FIELD = {"TAG": 0, "LOWER": 1, "DEP": 2, "IS_SPACE": 3}
_MEMO = 500_000  # token contexts remembered


@dataclass(frozen=True)
class Rule:
    """One POS-setting pattern: token conditions, which token of the match gets ``pos``."""

    order: int  # the pattern's position among the ruler's: later rules win
    tokens: tuple[tuple[tuple[int, Callable[[object], bool]], ...], ...]
    index: int
    pos: str
    tag: str | None = None  # a one-token rule's required tag, for lookup by tag

    def matches(self, parsed: Sequence[Token], k: int) -> bool:
        """Whether the match that puts token ``k`` at ``index`` holds."""
        start = k - self.index
        if start < 0 or start + len(self.tokens) > len(parsed):
            return False
        return all(test(parsed[start + t][field])
                   for t, conditions in enumerate(self.tokens) for field, test in conditions)


def _condition(value) -> Callable[[object], bool] | None:
    """A test for one attribute's value in a pattern; None for a form not supported here."""
    if isinstance(value, (str, bool)):
        return lambda got, value=value: got == value
    if isinstance(value, dict) and len(value) == 1:
        (op, values), = value.items()
        if op == "IN":
            return lambda got, values=frozenset(values): got in values
        if op == "NOT_IN":
            return lambda got, values=frozenset(values): got not in values
    return None


def compile_rules(patterns: Sequence[dict]) -> PosRules | None:
    """The POS-setting rules of an attribute ruler's ``patterns``; None when one of them uses
    a form this module does not implement (the ruler must then run as it is)."""
    rules = []
    for order, entry in enumerate(patterns):
        pos = entry.get("attrs", {}).get("POS")
        if pos is None:
            continue
        for pattern in entry["patterns"]:
            tokens = []
            for spec in pattern:
                conditions = []
                for key, value in spec.items():
                    test = _condition(value)
                    if key not in _FIELD or test is None:
                        return None
                    conditions.append((_FIELD[key], test))
                tokens.append(tuple(conditions))
            tag = pattern[0].get("TAG") if len(pattern) == 1 else None
            rules.append(Rule(order, tuple(tokens), int(entry.get("index", 0)), pos,
                              tag if isinstance(tag, str) else None))
    return PosRules(rules)


class PosRules:
    """Compiled rules: looked up by tag, with the POS of each token context seen memoised."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = list(rules)
        self.by_tag: dict[str, list[Rule]] = {}
        self.general: list[Rule] = []
        for rule in self.rules:
            (self.by_tag.setdefault(rule.tag, []) if rule.tag is not None
             else self.general).append(rule)
        self.span = max((len(rule.tokens) for rule in self.rules), default=1)
        self.seen: dict = {}

    def coarse_tags(self, parsed: Sequence[Token]) -> list[str]:
        """Each token's POS: the last rule (in the ruler's order) that matches it, else ""."""
        out = []
        for k in range(len(parsed)):
            # every rule that could match token k reads only these tokens: memoise on them
            first = max(0, k - self.span + 1)
            around = (k - first, tuple(parsed[first : k + self.span]))
            pos = self.seen.get(around)
            if pos is None:
                if len(self.seen) >= _MEMO:  # a bound on memory over very large corpora
                    self.seen.clear()
                pos = self.seen[around] = self._tag(parsed, k)
            out.append(pos)
        return out

    def _tag(self, parsed: Sequence[Token], k: int) -> str:
        best, pos = -1, ""
        for rule in (*self.by_tag.get(parsed[k][0], ()), *self.general):
            if rule.order > best and rule.matches(parsed, k):
                best, pos = rule.order, rule.pos
        return pos
