"""Summarise a py-spy raw (collapsed stacks) profile: where the samples go.

    python bench/profile_summary.py FILE [--top N] [--prefix relay/]

Prints, in % of all samples: the functions with the most self time (leaf frames), the
functions with the most inclusive time (on the stack at all), and the leaf lines of the
project's own code (paths starting with --prefix) with the most self time.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]+)(?::(?P<line>\d+))?\)$")


def split(frame: str) -> tuple[str, str, str]:
    m = FRAME.match(frame)
    if m is None:
        return frame, "?", ""
    return m["func"], m["file"], m["line"] or ""


def summarise(path: Path, top: int, prefix: str) -> str:
    self_fn: Counter[str] = Counter()
    incl_fn: Counter[str] = Counter()
    own_lines: Counter[str] = Counter()
    total = 0
    for raw in path.read_text().splitlines():
        stack, _, count_text = raw.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [split(f) for f in stack.split(";")]
        func, file, _line = frames[-1]
        self_fn[f"{func} ({file})"] += count
        for name in {f"{f} ({p})" for f, p, _ in frames}:
            incl_fn[name] += count
        for f, p, line in reversed(frames):  # deepest frame of our own code
            if p.startswith(prefix):
                own_lines[f"{f} ({p}:{line})"] += count
                break
    if total == 0:
        return f"{path}: no samples"
    out = [f"{path}: {total} samples"]
    for title, counter in (
        ("self time (leaf function)", self_fn),
        ("inclusive time", incl_fn),
        (f"deepest {prefix} line on the stack", own_lines),
    ):
        out.append(f"\n-- {title}")
        out += [f"{100 * n / total:6.1f}%  {name}" for name, n in counter.most_common(top)]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--prefix", default="relay/")
    args = parser.parse_args()
    for path in args.files:
        print(summarise(path, args.top, args.prefix))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
