"""JSON-lines fields whose type varies between rows, and what datasets does to them.

datasets reads such a field as JSON and decodes every row's string that looks like JSON: a valid row's "5" comes
back as the number 5, "null" as None. The row to blame is the one holding the number, not the valid one:

    line 2  {"messages": [..., {"role": "assistant", "content": "5"}]}    valid; datasets gives content 5
    line 4  {"messages": [..., {"role": "assistant", "content": 42}]}     the cause: a number where text belongs

In a data directory it is worse: the first shard's types win and a later shard's values are cast to them, so its
strings come back quoted ('"one"') and its numbers as strings, without any error.

jsft.data.sources reads JSON lines strictly first (datasets' on_mixed_types=None: `mixed_field` recognizes the
refusal). Only when that fails does it read them the default way and compare the rows with the files:
`decoding_damage` finds the first changed value, `number_rows` the rows holding a number or bool in that field (the
causes: raised, or skipped under data.skip_bad_rows and the rest read again). When no row holds a number (a list in
some rows, strings in others) there is no cause to skip, and the damage itself is the error: give the field one
type.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from jsft.data.formats import BadRowError


def file_rows(files: list[Path], drop: frozenset = frozenset()):
    """(row index in the split, file, line, row) of each row of JSON-lines files, in order: blank lines are no rows;
    malformed lines and the rows in `drop` keep their index but are not yielded (as a clean copy leaves them out)."""
    index = 0
    for file in files:
        with open(file, encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                if isinstance(row, dict) and index not in drop:
                    yield index, file, line_number, row
                index += 1


def mixed_field(error: BaseException | None) -> str | None:
    """'messages[].content' when `error` (or its cause) is datasets' strict reader refusing a field whose type varies
    between rows ('JSON parse error: Column(/messages/[]/content) changed from string to number in row 3')."""
    while error is not None:
        match = re.search(r"Column\((/[^)]*)\) changed from \w+ to \w+", str(error))
        if match:
            return "".join(p if p == "[]" else f".{p}" for p in match.group(1).strip("/").split("/")).lstrip(".")
        error = error.__cause__ or error.__context__
    return None


def decoding_damage(files: list[Path], dataset, drop: frozenset = frozenset()) -> BadRowError | None:
    """The first row whose value datasets changed (a string decoded as JSON, or a value turned into a string), as a
    BadRowError naming its file and line; None when every row reads as the file holds it. `dataset` holds the rows
    of `files` without `drop` and without malformed lines."""
    for (index, file, line, raw), read in zip(file_rows(files, drop), dataset):
        changed = _first_changed(raw, read, "")
        if changed is not None:
            field, held, value = changed
            every_row = re.sub(r"\[[0-9]+\]", "[]", field)
            return BadRowError(
                index, field, f"the {type(held).__name__} {held!r} is read as {value!r}: the type of this field varies "
                "between rows (e.g. a number or a list in some rows), so datasets reads it as JSON and changes values "
                "that look like JSON", f"give {every_row} one type in every row (e.g. strings)", f"{file}, line {line}")
    return None


def number_rows(files: list[Path], damage: BadRowError, drop: frozenset = frozenset()) -> list[BadRowError]:
    """The rows that hold a number or bool in the field of `damage` (a decoding_damage error), where text belongs:
    the causes of that damage, each a BadRowError naming its file and line. [] when no row holds one (a field mixing
    lists and strings, say): then there is no row to skip."""
    every_row = re.sub(r"\[[0-9]+\]", "[]", damage.field)
    causes = []
    for index, file, line, raw in file_rows(files, drop):
        where, number = next(((p, v) for p, v in _values_at(raw, _steps(every_row), "")
                              if isinstance(v, (bool, int, float))), (None, None))
        if where is not None:
            causes.append(BadRowError(
                index, where, f"{every_row} is the {type(number).__name__} {number!r} where other rows hold text; "
                f"datasets then reads the field as JSON and changes other rows (row {damage.row_index}: "
                f"{damage.problem.split(': ')[0].removeprefix('the ')}, {damage.source})",
                f"write it as a string ({json.dumps(str(number))}), or set data.skip_bad_rows=True to skip such rows",
                f"{file}, line {line}"))
    return causes


def _first_changed(raw, read, field: str) -> tuple[str, object, object] | None:
    """(field, the file's value, what datasets gave) where a string of the file came back as another value, or a
    value that is no string came back as one (a later shard's numbers and lists cast to the first shard's strings)."""
    if isinstance(raw, str) or (isinstance(read, str) and raw is not None):
        return None if raw == read else (field, raw, read)
    if isinstance(raw, dict) and isinstance(read, dict):
        return next(filter(None, (_first_changed(v, read.get(k), f"{field}.{k}" if field else k)
                                  for k, v in raw.items())), None)
    if isinstance(raw, list) and isinstance(read, list):
        return next(filter(None, (_first_changed(v, w, f"{field}[{j}]") for j, (v, w) in enumerate(zip(raw, read)))),
                    None)
    return None


def _steps(field: str) -> list[str]:
    """'messages[].content' -> ['messages', '[]', 'content']."""
    return [s if not s.startswith("[") else "[]" for s in re.findall(r"\[\d*\]|[^.\[\]]+", field)]


def _values_at(value, steps: list[str], field: str):
    """(field, value) at a field path in one row ('[]': every item of a list): ('messages[1].content', 42), ..."""
    if not steps:
        yield field, value
    elif steps[0] == "[]" and isinstance(value, list):
        for j, item in enumerate(value):
            yield from _values_at(item, steps[1:], f"{field}[{j}]")
    elif isinstance(value, dict) and steps[0] in value:
        yield from _values_at(value[steps[0]], steps[1:], f"{field}.{steps[0]}" if field else steps[0])
