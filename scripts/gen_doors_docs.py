"""Write docs/doors.md: which door supports what, from the conformance suite's declarations.

    python scripts/gen_doors_docs.py           # (re)write docs/doors.md
    python scripts/gen_doors_docs.py --check   # exit 1 if docs/doors.md is stale (a test runs this)

The declarations are tests/conformance/doors.py, the ones the suite holds every door to: a cell of the
table is a claim some case proves on every test run, never a hand-kept note.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "doors.md"
sys.path.insert(0, str(ROOT / "tests"))

from conformance.doors import DOORS, Absent, Door, Feature, Ignores, NotReported, Refuses, Splits  # noqa: E402

PREAMBLE = """\
# Which door supports what

scholarembed has one engine and several doors to it. Each door converts its own wire format and
nothing else: validation, limits, prompts, batching, pooling and encodings are the same code behind
every door, so a bad input gets the same words everywhere, in the door's own names for the fields.

This page is generated (`python scripts/gen_doors_docs.py`) from the declarations of the conformance
suite (`tests/conformance/`): one table of cases, run through every door on every test run, with
vectors checked against an independent implementation of the model card. A cell says what the suite
checks there:

- **yes**: the door serves the feature, and its cases pass;
- **refused** (code, field): the door does not serve it, and asking gets exactly this error, never a
  wrong result; `USAGE` is a command-line error (exit status 2), `ValueError` is raised by the client
  before anything is sent;
- **splits**: a per-request limit never applies, because the door cuts the input into requests itself;
- **ignored**: the door leaves it out by design, and the result is the one without it;
- **not reported**: it works, but the door does not return it;
- **–**: the door has no way to ask for it.
"""


def cell(door: Door, feature: Feature) -> str:
    support = door.support(feature)
    if support is None:
        return "yes"
    if isinstance(support, Refuses):
        return f"refused (`{support.code}`, `{support.field}`)"
    if isinstance(support, Splits):
        return "splits"
    if isinstance(support, Ignores):
        return "ignored"
    if isinstance(support, NotReported):
        return "not reported"
    assert isinstance(support, Absent)
    return "–"


def render() -> str:
    lines = [PREAMBLE, "| | " + " | ".join(door.title for door in DOORS) + " |", "|---" * (len(DOORS) + 1) + "|"]
    group = ""
    for feature in Feature:
        if feature.group != group:
            group = feature.group
            lines.append(f"| **{group}** |" + " |" * len(DOORS))
        lines.append(f"| {feature.label} | " + " | ".join(cell(door, feature) for door in DOORS) + " |")
    lines += ["", "## The doors", ""]
    for door in DOORS:
        lines.append(f"- **{door.title}**: {door.how}.")
        by_note: dict[str, list[Feature]] = {}
        for feature, support in door.declared.items():
            if support.note:
                by_note.setdefault(support.note, []).append(feature)
        lines += [f"  - {_features(features)}: {note}." for note, features in by_note.items()]
    return "\n".join(lines) + "\n"


def _features(features: list[Feature]) -> str:
    """Labels, or the group's name when they are all of a group."""
    groups = {feature.group for feature in features}
    if len(features) > 1 and len(groups) == 1 and set(features) == {f for f in Feature if f.group in groups}:
        return f"all of {groups.pop()}"
    return "; ".join(feature.label for feature in features)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/doors.md is not what would be written")
    args = parser.parse_args()
    page = render()
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        if current != page:
            sys.stdout.writelines(
                difflib.unified_diff(current.splitlines(True), page.splitlines(True), str(OUTPUT), "generated")
            )
            print(f"{OUTPUT.relative_to(ROOT)} is stale: run python scripts/gen_doors_docs.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.parent.mkdir(exist_ok=True)
    OUTPUT.write_text(page)
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
