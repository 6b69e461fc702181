"""Wall time of every job of a Snakemake run, from its log (.snakemake/log/*.snakemake.log).

    python benchmarks/rule_times.py [LOG]   (default: the newest log under .snakemake/log)

Prints one row per job (rule, wildcards, seconds from its start to its "Finished job"),
then the sum per rule and the run's span. Jobs that ran side by side overlap: the per-rule
sums can add up to more than the span.
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from datetime import datetime
from pathlib import Path

STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ [\d:]+ \d{4})\]$")


def jobs(text: str) -> list[tuple[str, str, float]]:
    started, rows, now, pending = {}, [], None, None
    for line in text.splitlines():
        m = STAMP.match(line.strip())
        if m:
            now = datetime.strptime(m.group(1), "%a %b %d %H:%M:%S %Y")
            continue
        s = line.strip()
        if m := re.match(r"^(?:local)?rule (\w+):$", s):
            pending = [m.group(1), "", now]
        elif pending and s.startswith("wildcards:"):
            pending[1] = s.split(":", 1)[1].strip()
        elif pending and (m := re.match(r"^jobid: (\d+)$", s)):
            started[m.group(1)] = pending
        elif (m := re.match(r"^Finished job(?:id:)? (\d+)\.?", s)) and m.group(1) in started:
            rule, wc, t0 = started.pop(m.group(1))
            rows.append((rule, wc, (now - t0).total_seconds()))
    return rows


def main() -> None:
    log = Path(sys.argv[1]) if len(sys.argv) > 1 else max(Path(".snakemake/log").glob("*.snakemake.log"))
    rows = jobs(log.read_text())
    total = defaultdict(float)
    for rule, wc, s in rows:
        print(f"{rule:22s} {s:7.0f} s  {wc}")
        total[rule] += s
    print("\nper rule (s):", ", ".join(f"{r} {s:.0f}" for r, s in sorted(total.items(), key=lambda kv: -kv[1])))
    stamps = [
        datetime.strptime(m.group(1), "%a %b %d %H:%M:%S %Y")
        for m in map(STAMP.match, map(str.strip, log.read_text().splitlines()))
        if m
    ]
    print(f"span: {(stamps[-1] - stamps[0]).total_seconds():.0f} s ({log})")


if __name__ == "__main__":
    main()
