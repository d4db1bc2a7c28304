"""How KEDA sizes a Deployment from a rendered ScaledObject, as KEDA documents it, so a test can feed it queue
lengths and read the replica count the cluster would reach.

- Without `advanced.scalingModifiers`: KEDA gives the HPA one external metric per trigger, each with an AverageValue
  target (redis-streams: `streamLength`; prometheus: `threshold`). The HPA computes ceil(value / target) for each
  metric and takes the largest.
- With `scalingModifiers`: the triggers' values are combined by `formula` (trigger names as variables) into one
  composite metric with the modifier's `target` (AverageValue by default): ceil(composite / target).
- Activation: with `minReplicaCount` 0, the workload is scaled to zero while no trigger is active (value above its
  activation threshold; with modifiers, the composite above `activationTarget`). Else the count is clamped to
  [minReplicaCount, maxReplicaCount].
"""

from __future__ import annotations

import ast
import math
import operator
from typing import Any

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_TARGET_KEY = {"redis-streams": "streamLength", "prometheus": "threshold"}
_ACTIVATION_KEY = {"redis-streams": "activationStreamLength", "prometheus": "activationThreshold"}


def evaluate_formula(formula: str, variables: dict[str, float]) -> float:
    """The arithmetic subset of KEDA's formula language (+ - * /, numbers, trigger names); anything else raises."""

    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return float(node.value)
        if isinstance(node, ast.Name):
            if node.id not in variables:
                raise KeyError(f"formula {formula!r} names {node.id!r}, which is no trigger's name")
            return variables[node.id]
        raise ValueError(f"unsupported formula syntax in {formula!r}: {ast.dump(node)}")

    return walk(ast.parse(formula, mode="eval"))


def trigger_key(trigger: dict[str, Any]) -> str:
    """What a trigger measures: its name, else its stream (redis-streams) or query (prometheus)."""
    return str(trigger.get("name") or trigger["metadata"].get("stream") or trigger["metadata"]["query"])


def desired_replicas(scaled_object: dict[str, Any], values: dict[str, float]) -> int:
    """Replicas KEDA and the HPA settle on for `values`: trigger_key(trigger) -> the trigger's metric value."""
    spec = scaled_object["spec"]
    triggers = spec["triggers"]

    def value_of(trigger: dict[str, Any]) -> float:
        return float(values[trigger_key(trigger)])

    modifiers = (spec.get("advanced") or {}).get("scalingModifiers")
    if modifiers:
        composite = evaluate_formula(modifiers["formula"], {t["name"]: value_of(t) for t in triggers})
        assert modifiers.get("metricType", "AverageValue") == "AverageValue", modifiers
        replicas = math.ceil(composite / float(modifiers["target"]))
        active = composite > float(modifiers.get("activationTarget", 0))
    else:
        replicas = max(math.ceil(value_of(t) / float(t["metadata"][_TARGET_KEY[t["type"]]])) for t in triggers)
        active = any(value_of(t) > float(t["metadata"].get(_ACTIVATION_KEY[t["type"]], 0)) for t in triggers)
    low, high = int(spec.get("minReplicaCount", 0)), int(spec.get("maxReplicaCount", 100))
    if low == 0 and not active:
        return 0
    return max(max(low, 1), min(high, replicas))
