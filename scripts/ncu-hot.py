#!/usr/bin/env python3
"""Where a kernel's warps wait, instruction by instruction, from Nsight Compute's source page.

Input: the CSV that `ncu --import REPORT --page source --print-source sass --csv` prints for a
report taken with the SourceCounters section (one or more profiled launches of one kernel).
Output, on stdout:
  - the columns the CSV held (so that a reader can tell which counters the tool version gave);
  - the warp-stall samples summed over the launches, in all and by opcode (the SASS mnemonic
    without its modifiers: HGMMA, MUFU, BAR, LDS, ...);
  - the instructions with the most samples, with their address, SASS text, share of all samples
    and, where the CSV breaks the samples down by stall reason, their three largest reasons.

The samples of one instruction are the warps found stalled (or issuing) at it when the sampler
looked, so the top of the list is where the time goes, and the reasons say on what.

Usage: ncu-hot.py SOURCE.csv [TOP]   (TOP: instructions listed, default 40)
"""
import csv
import re
import sys
from collections import OrderedDict, defaultdict

ALL_SAMPLES = re.compile(r"warp stall sampling \(all", re.I)
NOT_ISSUED = re.compile(r"warp stall sampling \(not", re.I)


def number(cell):
    """A numeric cell (ncu may print thousands separators), else None."""
    text = cell.strip().replace(",", "")
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def opcode(sass):
    """HGMMA for '@!P0 HGMMA.64x32x16.F32.BF16 R24, ...': the mnemonic, less predicate and modifiers."""
    words = sass.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0].split(".")[0] if words else "?"


def read(path):
    """(columns, rows): rows keyed by (address, sass), numeric columns summed over the launches."""
    columns = None
    rows = OrderedDict()
    with open(path, newline="") as f:
        for cells in csv.reader(f):
            lowered = [c.strip().lower() for c in cells]
            if "source" in lowered and any(ALL_SAMPLES.search(c) for c in cells):
                columns = [c.strip() for c in cells]  # a header: a new launch's table starts
                continue
            if columns is None or len(cells) != len(columns):
                continue
            rec = dict(zip(columns, cells))
            key = (rec.get("Address", "").strip(), rec.get("Source", "").strip())
            acc = rows.setdefault(key, defaultdict(float))
            for name, cell in rec.items():
                value = number(cell)
                if value is not None and name not in ("Address", "Source"):
                    acc[name] += value
    if columns is None:
        raise SystemExit(f"{path}: no source-page header (a 'Source' column and a 'Warp Stall Sampling (All ...)' one)")
    return columns, rows


def main(argv):
    if len(argv) < 2:
        raise SystemExit(__doc__)
    top = int(argv[2]) if len(argv) > 2 else 40
    columns, rows = read(argv[1])
    all_col = next(c for c in columns if ALL_SAMPLES.search(c))
    not_col = next((c for c in columns if NOT_ISSUED.search(c)), None)
    # Per-reason sample columns, where the tool version gives them: the other columns that name a
    # stall (not the two totals).
    reasons = [c for c in columns if "stall" in c.lower() and c not in (all_col, not_col)]
    total = sum(r[all_col] for r in rows.values())
    print("columns: " + " | ".join(columns))
    print(f"instructions: {len(rows)}; warp-stall samples: {total:.0f}"
          + (f" ({sum(r[not_col] for r in rows.values()):.0f} not issued)" if not_col else ""))
    if total <= 0:
        print("no samples")
        return
    by_op = defaultdict(float)
    for (_, sass), r in rows.items():
        by_op[opcode(sass)] += r[all_col]
    print("\nsamples by opcode:")
    for op, s in sorted(by_op.items(), key=lambda kv: -kv[1])[:20]:
        print(f"  {op:<12} {s:10.0f}  {100 * s / total:5.1f}%")
    print(f"\nthe {top} instructions with the most samples:")
    ranked = sorted(rows.items(), key=lambda kv: -kv[1][all_col])[:top]
    for (addr, sass), r in ranked:
        line = f"  {addr:>8} {100 * r[all_col] / total:5.1f}% {r[all_col]:8.0f}  {sass}"
        if reasons:
            best = sorted(((r[c], c) for c in reasons if r[c] > 0), reverse=True)[:3]
            if best:
                line += "   [" + ", ".join(f"{c} {100 * v / max(r[all_col], 1):.0f}%" for v, c in best) + "]"
        print(line)


if __name__ == "__main__":
    main(sys.argv)
