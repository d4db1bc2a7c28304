"""A small renderer for the subset of Go templates + Sprig that k8s/spo-diffusion uses, for the tests only.

`helm` cannot be installed on this project's machines, yet a chart is mostly indentation and conditionals, which
only rendering checks. This renders the chart the way `helm template` does for what the chart uses (actions with
whitespace trimming, if / else if / else, range with index and value, with, define / include, variables with Go's
block scoping, pipelines, parentheses, the Sprig functions listed in FUNCTIONS, .Files.Get, .Release, .Chart) and
fails loudly on anything else. It is not Helm: where helm exists, tests/deploy also runs `helm template`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml


class TemplateError(Exception):
    """A template the renderer cannot parse, or `fail` / `required` raised by the chart itself."""


# -- lexing and parsing -------------------------------------------------------------------------------------------

ACTION = re.compile(r"\{\{(-[ \t\r\n])?(.*?)([ \t\r\n]-)?\}\}", re.S)
TOKEN = re.compile(r"""
    (?P<ws>\s+) | (?P<str>"(?:[^"\\]|\\.)*") | (?P<raw>`[^`]*`) | (?P<num>-?\d+(?:\.\d+)?)
  | (?P<decl>:=) | (?P<assign>=) | (?P<pipe>\|) | (?P<lp>\() | (?P<rp>\)) | (?P<comma>,)
  | (?P<var>\$\w*(?:\.\w+)*) | (?P<field>(?:\.\w+)+|\.) | (?P<ident>\w+)
""", re.X)


def tokenize(source: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(source):
        m = TOKEN.match(source, pos)
        if not m:
            raise TemplateError(f"cannot tokenize {source[pos:]!r} in {source!r}")
        pos = m.end()
        if m.lastgroup != "ws":
            out.append((m.lastgroup, m.group()))
    return out


def lex(text: str) -> list[tuple[str, str]]:
    """[('text', s) | ('action', s)] with Go's trim markers applied."""
    parts: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in ACTION.finditer(text):
        chunk = text[pos:m.start()]
        if trim_next:
            chunk = chunk.lstrip()
        if m.group(1):
            chunk = chunk.rstrip()
        parts.append(("text", chunk))
        body = m.group(2).strip()
        if not body.startswith("/*"):
            parts.append(("action", body))
        pos, trim_next = m.end(), bool(m.group(3))
    tail = text[pos:]
    parts.append(("text", tail.lstrip() if trim_next else tail))
    return parts


def parse(parts: list[tuple[str, str]], defines: dict[str, list]) -> list:
    """Nodes: ('text', s), ('out', pipeline), ('if', [(pipe, body)...], else_body), ('range', vars, pipe, body,
    else_body), ('with', pipe, body, else_body)."""
    pos = 0

    def block(stop: tuple[str, ...]) -> tuple[list, str]:
        nonlocal pos
        nodes = []
        while pos < len(parts):
            kind, value = parts[pos]
            pos += 1
            if kind == "text":
                if value:
                    nodes.append(("text", value))
                continue
            word = value.split(None, 1)[0] if value else ""
            if word in ("end", "else") and word in stop:
                return nodes, value
            if word == "if":
                branches, else_body = [(pipeline(value[2:]), None)], []
                body, closer = block(("end", "else"))
                branches[-1] = (branches[-1][0], body)
                while closer.startswith("else"):
                    rest = closer[4:].strip()
                    if rest.startswith("if "):
                        cond = pipeline(rest[3:])
                        body, closer = block(("end", "else"))
                        branches.append((cond, body))
                    else:
                        else_body, closer = block(("end",))
                nodes.append(("if", branches, else_body))
            elif word in ("range", "with"):
                head = value[len(word):].strip()
                names: list[str] = []
                m = re.match(r"^(\$\w+)(?:\s*,\s*(\$\w+))?\s*:=\s*(.*)$", head, re.S)
                if m:
                    names = [n for n in m.group(1, 2) if n]
                    head = m.group(3)
                body, closer = block(("end", "else"))
                else_body = block(("end",))[0] if closer.startswith("else") else []
                if word == "range":
                    nodes.append(("range", names, pipeline(head), body, else_body))
                else:
                    nodes.append(("with", pipeline(head), body, else_body))
            elif word == "define":
                name = json.loads(value[len("define"):].strip())
                defines[name] = block(("end",))[0]
            elif word in ("end", "else", "block", "template", "break", "continue"):
                raise TemplateError(f"unsupported or unbalanced action {{{{ {value} }}}}")
            else:
                nodes.append(("out", pipeline(value)))
        if stop:
            raise TemplateError(f"missing {{{{ end }}}} (expected one of {stop})")
        return nodes, ""

    return block(())[0]


def pipeline(source: str) -> tuple:
    """('pipe', decl, var, [commands]); a command is a list of operands."""
    tokens = tokenize(source)
    decl = var = None
    if len(tokens) > 1 and tokens[0][0] == "var" and tokens[1][0] in ("decl", "assign"):
        var, decl = tokens[0][1], tokens[1][0]
        tokens = tokens[2:]
    pos = 0

    def parse_pipe(closing: str | None) -> list:
        nonlocal pos
        commands, current = [], []
        while pos < len(tokens):
            kind, value = tokens[pos]
            pos += 1
            if kind == "pipe":
                commands.append(current)
                current = []
            elif kind == "rp":
                if closing != "rp":
                    raise TemplateError(f"unbalanced ) in {source!r}")
                commands.append(current)
                return commands
            elif kind == "lp":
                current.append(("sub", parse_pipe("rp")))
            elif kind == "str":
                current.append(("lit", json.loads(value)))
            elif kind == "raw":
                current.append(("lit", value[1:-1]))
            elif kind == "num":
                current.append(("lit", float(value) if "." in value else int(value)))
            elif kind in ("var", "field"):
                current.append((kind, value))
            elif kind == "ident":
                current.append(("lit", {"true": True, "false": False, "nil": None}[value]) if value in
                               ("true", "false", "nil") else ("fn", value))
            else:
                raise TemplateError(f"unexpected {value!r} in {source!r}")
        if closing:
            raise TemplateError(f"missing ) in {source!r}")
        commands.append(current)
        return commands

    return ("pipe", decl, var, parse_pipe(None))


# -- evaluation ---------------------------------------------------------------------------------------------------


def truthy(value: Any) -> bool:
    return not (value is None or value is False or value == 0 or value == "" or value == [] or value == {})


def go_str(value: Any) -> str:
    """Go's %v for what the chart prints (Helm prints a missing value as an empty string)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, list):
        return "[" + " ".join(go_str(v) for v in value) + "]"
    if isinstance(value, dict):
        return "map[" + " ".join(f"{k}:{go_str(v)}" for k, v in sorted(value.items())) + "]"
    return str(value)


def to_yaml(value: Any) -> str:
    if value is None:
        return "null"
    return yaml.safe_dump(value, default_flow_style=False, sort_keys=True, width=10_000).rstrip("\n") \
        .removesuffix("\n...")


def printf(fmt: str, *args: Any) -> str:
    values = iter(args)

    def one(m: re.Match) -> str:
        if m.group() == "%%":
            return "%"
        value = next(values)
        return json.dumps(go_str(value)) if m.group() == "%q" else go_str(value)

    return re.sub(r"%[sdvq%]", one, fmt)


def indent(n: int, text: str) -> str:
    return "\n".join(" " * n + line for line in str(text).split("\n"))


def required(message: str, value: Any) -> Any:
    if value is None or value == "":
        raise TemplateError(f"required: {message}")
    return value


def fail(message: str) -> None:
    raise TemplateError(f"fail: {message}")


def cmp_eq(first: Any, *others: Any) -> bool:
    return any(first == other for other in others)


def and_(*args: Any) -> Any:
    for arg in args:
        if not truthy(arg):
            return arg
    return args[-1]


def or_(*args: Any) -> Any:
    for arg in args:
        if truthy(arg):
            return arg
    return args[-1]


def set_(d: dict, key: str, value: Any) -> dict:
    d[key] = value
    return d


def mul(*args: Any) -> int:
    out = 1
    for arg in args:
        out *= int(arg)
    return out


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "default": lambda d, v=None: v if truthy(v) else d,
    "trunc": lambda n, s: str(s)[:n] if n >= 0 else str(s)[n:],
    "trimSuffix": lambda suffix, s: str(s).removesuffix(suffix),
    "trim": lambda s: str(s).strip(),
    "contains": lambda sub, s: sub in str(s),
    "printf": printf,
    "replace": lambda old, new, s: str(s).replace(old, new),
    "lower": lambda s: str(s).lower(),
    "quote": lambda *a: " ".join(json.dumps(go_str(v)) for v in a if v is not None),
    "toYaml": to_yaml,
    "fromYaml": lambda s: yaml.safe_load(s) or {},
    "toJson": lambda v: json.dumps(v, sort_keys=True, separators=(",", ":")),
    "toString": go_str,
    "nindent": lambda n, s: "\n" + indent(n, s),
    "indent": indent,
    "required": required,
    "fail": fail,
    "sha256sum": lambda s: hashlib.sha256(str(s).encode()).hexdigest(),
    "list": lambda *a: list(a),
    "append": lambda lst, v: [*(lst or []), v],
    "join": lambda sep, lst: sep.join(go_str(v) for v in lst),
    "dict": lambda *kv: {kv[i]: kv[i + 1] for i in range(0, len(kv), 2)},
    "get": lambda d, k: d.get(k, ""),
    "set": set_,
    "hasKey": lambda d, k: k in d,
    "deepCopy": copy.deepcopy,
    "int": lambda v: int(float(v or 0)),
    "eq": cmp_eq,
    "ne": lambda a, b: a != b,
    "not": lambda v: not truthy(v),
    "and": and_,
    "or": or_,
    "gt": lambda a, b: a > b,
    "mul": mul,
    "regexReplaceAll": lambda regex, s, repl: re.sub(regex, repl.replace("${", "\\g<").replace("}", ">"), str(s)),
    "ternary": lambda t, f, cond: t if truthy(cond) else f,
}


class Scope:
    """Go template variables: declared in the innermost block, assigned where they were declared."""

    def __init__(self, parent: Scope | None = None) -> None:
        self.vars: dict[str, Any] = {}
        self.parent = parent

    def lookup(self, name: str) -> Any:
        scope = self
        while scope is not None:
            if name in scope.vars:
                return scope.vars[name]
            scope = scope.parent
        raise TemplateError(f"undefined variable {name}")

    def assign(self, name: str, value: Any) -> None:
        scope = self
        while scope is not None:
            if name in scope.vars:
                scope.vars[name] = value
                return
            scope = scope.parent
        raise TemplateError(f"assignment to undeclared variable {name}")


def field(value: Any, names: list[str]) -> Any:
    for name in names:
        if value is None:
            return None
        value = value.get(name) if isinstance(value, dict) else getattr(value, name, None)
    return value


class Chart:
    """A chart folder rendered with given values, as `helm template RELEASE CHART -f values` would."""

    def __init__(self, path: Path, values: dict, release: str = "spo", namespace: str = "default") -> None:
        self.path = path
        meta = yaml.safe_load((path / "Chart.yaml").read_text())
        self.root = {
            "Values": values,
            "Release": {"Name": release, "Namespace": namespace, "Service": "Helm", "IsInstall": True},
            "Chart": {"Name": meta["name"], "Version": meta["version"], "AppVersion": meta.get("appVersion")},
            "Files": type("Files", (), {"Get": staticmethod(lambda name: (path / name).read_text())})(),
        }
        self.defines: dict[str, list] = {}
        self.templates = {}
        for template in sorted((path / "templates").iterdir()):
            self.templates[template.name] = parse(lex(template.read_text()), self.defines)

    def render(self) -> dict[str, str]:
        """Output of every template except helpers (`_*`)."""
        return {name: self._run(nodes, self.root, Scope()) for name, nodes in self.templates.items()
                if not name.startswith("_")}

    def manifests(self) -> list[dict]:
        """The rendered Kubernetes objects."""
        docs = []
        for name, text in self.render().items():
            if name.endswith((".yaml", ".yml")):
                try:
                    docs += [d for d in yaml.safe_load_all(text) if d]
                except yaml.YAMLError as err:
                    raise TemplateError(f"{name} renders to invalid YAML: {err}\n{text}") from None
        return docs

    # -- execution

    def _run(self, nodes: list, dot: Any, scope: Scope) -> str:
        out = []
        for node in nodes:
            kind = node[0]
            if kind == "text":
                out.append(node[1])
            elif kind == "out":
                value = self._pipe(node[1], dot, scope)
                if node[1][1] is None:  # declarations and assignments print nothing
                    out.append(go_str(value))
            elif kind == "if":
                for cond, body in node[1]:
                    if truthy(self._pipe(cond, dot, scope)):
                        out.append(self._run(body, dot, Scope(scope)))
                        break
                else:
                    out.append(self._run(node[2], dot, Scope(scope)))
            elif kind == "with":
                value = self._pipe(node[1], dot, scope)
                body = node[2] if truthy(value) else node[3]
                out.append(self._run(body, value if truthy(value) else dot, Scope(scope)))
            elif kind == "range":
                names, pipe, body, else_body = node[1:]
                value = self._pipe(pipe, dot, scope)
                items = sorted(value.items()) if isinstance(value, dict) else list(enumerate(value or []))
                if not items:
                    out.append(self._run(else_body, dot, Scope(scope)))
                for key, item in items:
                    inner = Scope(scope)
                    if len(names) == 1:
                        inner.vars[names[0]] = item
                    elif len(names) == 2:
                        inner.vars[names[0]], inner.vars[names[1]] = key, item
                    out.append(self._run(body, item, inner))
        return "".join(out)

    def _pipe(self, pipe: tuple, dot: Any, scope: Scope) -> Any:
        _, decl, var, commands = pipe
        value, piped = None, False
        for command in commands:
            value = self._command(command, dot, scope, value if piped else _NOTHING)
            piped = True
        if decl == "decl":
            scope.vars[var] = value
        elif decl == "assign":
            scope.assign(var, value)
        return value

    def _command(self, operands: list, dot: Any, scope: Scope, piped: Any) -> Any:
        head = operands[0]
        args = [self._operand(op, dot, scope) for op in operands[1:]]
        if piped is not _NOTHING:
            args.append(piped)
        if head[0] == "fn":
            name = head[1]
            if name == "include":
                return self._run(self.defines[args[0]], args[1], Scope())
            if name not in FUNCTIONS:
                raise TemplateError(f"function {name!r} is not supported by this renderer")
            return FUNCTIONS[name](*args)
        value = self._operand(head, dot, scope)
        if callable(value):
            return value(*args)
        if args:
            raise TemplateError(f"{head[1]} is not a function but has arguments")
        return value

    def _operand(self, op: tuple, dot: Any, scope: Scope) -> Any:
        kind, value = op
        if kind == "lit":
            return value
        if kind == "sub":
            return self._pipe(("pipe", None, None, value), dot, scope)
        if kind == "field":
            return dot if value == "." else field(dot, value.split(".")[1:])
        if kind == "var":
            name, *names = value.split(".")
            base = self.root if name == "$" else scope.lookup(name)
            return field(base, names)
        if kind == "fn":  # a function with no arguments used as an argument, e.g. `default (dict)`
            return FUNCTIONS[value]()
        raise TemplateError(f"unexpected operand {op}")


_NOTHING = object()
