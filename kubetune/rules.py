"""The CRD's CEL rules evaluated offline, so `kubetune validate`, the trainer and the operator refuse what the API
server refuses, from the one definition in kubetune/api.py."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cel
from pydantic import BaseModel
from pydantic.fields import FieldInfo

VALIDATIONS = "x-kubernetes-validations"


@dataclass(frozen=True)
class RuleViolation:
    """A CEL rule an object breaks: where (a wire path below the object checked) and the rule's message."""

    path: tuple[str | int, ...]
    message: str

    def __str__(self) -> str:
        where = ".".join(str(part) for part in self.path)
        return f"{where}: {self.message}" if where else self.message


@functools.cache
def compiled(expression: str) -> Any:
    """A CEL program, compiled once per expression."""
    return cel.compile(expression)


@functools.cache
def model_rules(model_class: type[BaseModel]) -> list[Mapping[str, Any]]:
    """The rules a model class puts on its own node (model_config's json_schema_extra, a dict or a callable)."""
    extra: Any = model_class.model_config.get("json_schema_extra")
    if callable(extra):
        schema: dict[str, Any] = {}
        extra(schema, model_class)
        extra = schema
    return list((extra or {}).get(VALIDATIONS, []))


def field_rules(field: FieldInfo) -> list[Mapping[str, Any]]:
    """The rules a field puts on its value's node."""
    extra = field.json_schema_extra
    return list(extra.get(VALIDATIONS, [])) if isinstance(extra, dict) else []  # type: ignore[arg-type]


@functools.cache
def field_path_parts(field_path: str) -> tuple[str, ...]:
    """`.quantization.bits` -> ("quantization", "bits")."""
    return tuple(part for part in field_path.split(".") if part)


def is_transition_rule(rule: Mapping[str, Any]) -> bool:
    """Rules on oldSelf compare an update with the stored object; there is none offline."""
    return "oldSelf" in rule["rule"]


_SELF_FIELD = re.compile(r"\bself\.(\w+)")
_SELF_ALONE = re.compile(r"\bself\b(?!\.\w)")


@dataclass(frozen=True)
class NodeRules:
    """The rules checked offline at one node, and the top-level fields they read (None: the whole value)."""

    rules: tuple[Mapping[str, Any], ...]
    reads: frozenset[str] | None

    @classmethod
    def of(cls, rules: Sequence[Mapping[str, Any]]) -> NodeRules:
        checked = tuple(rule for rule in rules if not is_transition_rule(rule))
        expressions = [rule["rule"] for rule in checked]
        whole = any(_SELF_ALONE.search(expression) for expression in expressions)
        reads = None if whole else frozenset(name for e in expressions for name in _SELF_FIELD.findall(e))
        return cls(checked, reads)

    def value_read(self, value: Any) -> Any:
        """value cut down to the fields the rules read: converting it into CEL's types is most of the cost."""
        if self.reads is None or not isinstance(value, Mapping):
            return value
        return {name: field for name, field in value.items() if name in self.reads}


@functools.cache
def class_rules(model_class: type[BaseModel]) -> NodeRules:
    """The rules checked offline on a model class's own node."""
    return NodeRules.of(model_rules(model_class))


@functools.cache
def field_plan(model_class: type[BaseModel]) -> tuple[tuple[str, str, NodeRules], ...]:
    """(attribute, wire name, rules on its value) of every field of the class."""
    return tuple(
        (name, field.alias or name, NodeRules.of(field_rules(field)))
        for name, field in model_class.model_fields.items()
    )


def broken_rules(node: NodeRules, value: Any, path: tuple[str | int, ...]) -> Iterator[RuleViolation]:
    """Each rule that `value` (as the API server sees it: the wire form) does not satisfy."""
    if not node.rules:
        return
    context = cel.Context(variables={"self": node.value_read(value)})  # converted once per node, not per rule
    for rule in node.rules:
        where = (*path, *field_path_parts(rule.get("fieldPath", "")))
        try:
            holds = compiled(rule["rule"]).execute(context)
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            # The API server refuses an object its rule cannot evaluate on, too.
            yield RuleViolation(where, f"{rule['message']} (the rule could not be evaluated: {error})")
            continue
        if holds is not True:
            yield RuleViolation(where, rule_message(rule, context))


def rule_message(rule: Mapping[str, Any], context: Any) -> str:
    """The rule's messageExpression evaluated on value when it has one (as the API server does), else its message."""
    expression = rule.get("messageExpression")
    if expression:
        try:
            message = compiled(expression).execute(context)
        except (KeyError, TypeError, ValueError, RuntimeError):
            message = None
        if isinstance(message, str) and message:
            return message
    return str(rule["message"])


def rule_violations(model: BaseModel) -> list[RuleViolation]:
    """Every CEL rule that model and the models inside it break, each with its wire path below model."""
    return list(_violations(model, model.model_dump(by_alias=True, exclude_none=True, mode="json"), ()))


def _violations(model: BaseModel, wire: Mapping[str, Any], path: tuple[str | int, ...]) -> Iterator[RuleViolation]:
    own = class_rules(type(model))
    if own.rules:
        yield from broken_rules(own, wire, path)
    for name, alias, rules in field_plan(type(model)):
        value = getattr(model, name)
        if value is None:
            continue
        if rules.rules:
            yield from broken_rules(rules, wire.get(alias), (*path, alias))
        if isinstance(value, BaseModel):
            yield from _violations(value, wire[alias], (*path, alias))
        elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
            for index, item in enumerate(value):
                yield from _violations(item, wire[alias][index], (*path, alias, index))
