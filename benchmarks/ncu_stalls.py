"""Where the warps of a kernel wait, instruction by instruction: a summary of Nsight Compute's source
page (per-SASS-instruction warp-stall sampling, section ``SourceCounters``).

    ncu --section SourceCounters -o rep ...                       # scripts/gpu_check.sh, profile phase
    ncu --import rep.ncu-rep --page source --csv --print-source sass > sass.csv
    python -m benchmarks.ncu_stalls sass.csv > stalls.md

For each profiled launch: its samples by opcode and the instructions with the most samples, each with
its main stall reasons. A sample sits on the instruction a warp could not issue: a ``long_sb`` stall on
an instruction waits for a global load (or ``cp.async``) it consumes, ``barrier`` for the other warps.

The CSV's layout (ncu 2021.3 or newer): per launch a ``"Kernel Name","..."`` row, a header row starting
``"Address","Source"``, then one row per instruction; ``-`` is an empty cell. Columns are found by name
prefix (``Warp Stall Sampling (All`` was ``(All Cycles)`` in older versions; per-reason columns
``stall_*``, their ``(Not Issued)`` variants ignored), so a column an ncu version lacks is left out.
"""

from __future__ import annotations

import csv
import sys
from collections import Counter
from dataclasses import dataclass, field

TOP_INSTRUCTIONS = 30
TOP_OPCODES = 12
TOP_REASONS = 3


@dataclass
class Launch:
    kernel: str
    columns: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)


def _number(cell: str) -> float:
    cell = cell.strip().replace(",", "")
    if cell in ("", "-"):
        return 0.0
    try:
        return float(cell)
    except ValueError:
        return 0.0


def parse(text: str) -> list[Launch]:
    """The launches of an ``ncu --page source --csv --print-source sass`` output (lines before the first
    quoted row, e.g. ``==PROF==`` messages, are skipped)."""
    launches: list[Launch] = []
    current: Launch | None = None
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]
    for row in csv.reader(lines):
        if not row:
            continue
        head = row[0].strip()
        if head in ("Kernel Name", "Function Name"):
            current = Launch(kernel=row[1].strip() if len(row) > 1 else "?")
            launches.append(current)
        elif head == "Address":
            if current is None:
                current = Launch(kernel="?")
                launches.append(current)
            current.columns = [c.strip() for c in row]
        elif current is not None and current.columns and head.lower().startswith("0x"):
            current.rows.append(row)
    return [la for la in launches if la.rows]


def _column(columns: list[str], *prefixes: str) -> int | None:
    for prefix in prefixes:
        for i, name in enumerate(columns):
            if name.startswith(prefix):
                return i
    return None


def _opcode(sass: str) -> str:
    words = sass.split()
    if words and words[0].startswith("@"):  # predicate
        words = words[1:]
    return words[0].split(".")[0] if words else "?"


def summarize(launch: Launch, index: int) -> str:
    cols = launch.columns
    samples_col = _column(cols, "Warp Stall Sampling (All", "Warp Stall Sampling (Not", "# Samples")
    src_col = _column(cols, "Source")
    name = launch.kernel if len(launch.kernel) <= 160 else launch.kernel[:157] + "..."
    out = [f"### Launch {index}: `{name}`", ""]
    if samples_col is None or src_col is None:
        out += [f"No stall-sampling column in this ncu's CSV (columns: {', '.join(cols)}).", ""]
        return "\n".join(out)
    reason_cols = [(i, c[6:]) for i, c in enumerate(cols) if c.startswith("stall_") and "Not Issued" not in c]
    base = int(launch.rows[0][0], 16)
    recs = []
    for row in launch.rows:
        if len(row) <= max(samples_col, src_col):
            continue
        sass = " ".join(row[src_col].split())
        reasons = sorted(((_number(row[i]), r) for i, r in reason_cols if i < len(row)), reverse=True)
        recs.append((_number(row[samples_col]), int(row[0], 16) - base, sass, reasons))
    total = sum(r[0] for r in recs)
    out.append(
        f"{len(recs)} instructions, {total:.0f} samples (column `{cols[samples_col]}`); "
        f"per-reason columns: {len(reason_cols) or 'none'}."
    )
    out.append("")
    if total <= 0:
        return "\n".join(out + ["No samples.", ""])

    by_op: Counter[str] = Counter()
    reasons_all: Counter[str] = Counter()
    for s, _off, sass, reasons in recs:
        by_op[_opcode(sass)] += s
        for v, r in reasons:
            reasons_all[r] += v
    if reasons_all:
        top = ", ".join(f"{r} {100 * v / total:.1f}%" for r, v in reasons_all.most_common(8) if v > 0)
        out += [f"Stall reasons over the kernel: {top}.", ""]
    out += ["| opcode | samples | share |", "|---|---|---|"]
    out += [f"| {op} | {s:.0f} | {100 * s / total:.1f}% |" for op, s in by_op.most_common(TOP_OPCODES)]
    out.append("")
    out += [
        "| offset | samples | share | main reasons | SASS |",
        "|---|---|---|---|---|",
    ]
    for s, off, sass, reasons in sorted(recs, key=lambda r: -r[0])[:TOP_INSTRUCTIONS]:
        main = ", ".join(f"{r} {100 * v / s:.0f}%" for v, r in reasons[:TOP_REASONS] if v > 0 and s > 0)
        text = sass if len(sass) <= 90 else sass[:87] + "..."
        out.append(f"| {off:#06x} | {s:.0f} | {100 * s / total:.1f}% | {main} | `{text}` |")
    out.append("")
    return "\n".join(out)


def report(text: str) -> str:
    launches = parse(text)
    head = [
        "## Warp stalls by SASS instruction (Nsight Compute source page)",
        "",
        "A sample counts a warp that could not issue, on the instruction it was waiting at: `long_sb` =",
        "waiting for a global load or cp.async it consumes, `barrier` = for the other warps of the block,",
        "`short_sb` = for shared memory or MUFU, `wait` = a fixed-latency dependency, `math` / `mio` /",
        "`lg` = a busy pipe or queue. Offsets count from the kernel's first instruction (nvdisasm's).",
        "",
    ]
    if not launches:
        return "\n".join(head + ["No launch with per-instruction rows in the input.", ""])
    return "\n".join(head + [summarize(la, i + 1) for i, la in enumerate(launches)])


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m benchmarks.ncu_stalls SOURCE_PAGE.csv", file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8", errors="replace") as f:
        sys.stdout.write(report(f.read()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
