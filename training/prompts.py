"""Prompt files for `spo train spo --prompts` and `spo eval compare --prompts`.

Three layouts, chosen by the file's suffix: `.json`, a JSON list of strings (the reference's 4k training prompts;
objects with a `prompt` field are taken too); `.jsonl`, one JSON object with a `prompt` field per line (or a JSON
string); anything else, one prompt per line. A prompt set collected by hand has bad lines, so an empty, undecodable
or malformed entry is skipped and reported, never fatal; only a file with no usable prompt at all is an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class PromptFileError(ValueError):
    """The prompt file cannot be read at all, or holds no usable prompt."""


@dataclass(frozen=True)
class PromptFile:
    path: Path
    prompts: list[str]
    problems: list[str] = field(default_factory=list)  # "line 3: empty", one per skipped entry

    def report(self, limit: int = 20) -> str:
        """What was skipped, for a warning (empty when nothing was)."""
        if not self.problems:
            return ""
        shown = self.problems[:limit] + ([f"... and {len(self.problems) - limit} more"]
                                         if len(self.problems) > limit else [])
        return (f"{self.path}: skipped {len(self.problems)} entr{'y' if len(self.problems) == 1 else 'ies'} "
                f"({len(self.prompts)} prompts kept):\n  " + "\n  ".join(shown))


def _prompt_of(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("prompt")
    return value.strip() if isinstance(value, str) and value.strip() else None


def _what(value: Any) -> str:
    if isinstance(value, dict):
        return "no non-empty string 'prompt' field"
    if isinstance(value, str):
        return "empty"
    return f"not a string ({type(value).__name__})"


def read_prompts(path: Path | str) -> PromptFile:
    """The usable prompts of a .json / .jsonl / text file, in file order, and what was skipped."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise PromptFileError(f"cannot read {path}: {err.strerror or err}") from err
    prompts: list[str] = []
    problems: list[str] = []
    if path.suffix.lower() == ".json":
        try:
            items = json.loads(data.decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise PromptFileError(f"{path} is not a JSON list of prompts: {err}") from err
        if not isinstance(items, list):
            raise PromptFileError(f"{path} is not a JSON list of prompts (a {type(items).__name__})")
        for i, item in enumerate(items):
            prompt = _prompt_of(item)
            if prompt is None:
                problems.append(f"item {i}: {_what(item)}")
            else:
                prompts.append(prompt)
    else:
        jsonl = path.suffix.lower() == ".jsonl"
        lines = data.split(b"\n")
        if lines and not lines[-1].strip():
            lines.pop()  # the final newline
        for number, raw in enumerate(lines, start=1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8").strip()
            except UnicodeDecodeError:
                problems.append(f"line {number}: not UTF-8")
                continue
            if not text:
                problems.append(f"line {number}: empty")
                continue
            if not jsonl:
                prompts.append(text)
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                problems.append(f"line {number}: not JSON ({err.msg})")
                continue
            prompt = _prompt_of(value)
            if prompt is None:
                problems.append(f"line {number}: {_what(value)}")
            else:
                prompts.append(prompt)
    if not prompts:
        detail = f" ({'; '.join(problems[:3])})" if problems else ""
        raise PromptFileError(f"{path} holds no usable prompt{detail}")
    return PromptFile(path, prompts, problems)
