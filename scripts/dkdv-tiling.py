#!/usr/bin/env python3
"""How much work the attention kernels' tiles do beyond the visible (row, key) pairs, and whether
another split of the keys into dK/dV tiles would lighten the dK/dV kernel's busiest warpgroup.

Keys are the N content tokens, then the P = N - C mask tokens, in rank order; a row with first
hidden key a (C <= a <= N) sees keys [0, a) and [a + P, N + P) (SPEC.md, "Visibility"). Rows are
taken in position order (cuda/attention.cu, row_at): content rows 0..C-1 and the P mask rows
(a = C), then query row q (a = C + q) and content row C + q (a = C + q + 1) in turn.

    scripts/dkdv-tiling.py [N C [STEP]]      (default: ViT's 197 50, STEP 4)

Prints the chunks each kernel computes (the forward and dQ: 64-row tiles x 32-key chunks; dK/dV:
64-key tiles x 32-position chunks), the fewest chunks any split of the keys into runs of at most
64 computes (dynamic programming), and the smallest load of the busiest of the three dK/dV
warpgroups over every deal of the tiles and every split whose run ends fall on multiples of STEP
keys. At ViT's size: a second with STEP 4, about ten minutes with STEP 1; both give 25, the
busiest warpgroup's load now (the deal's 25 / 21 / 25). Last, the `wgmma-balanced` plan's
busiest warpgroup (src/ops/attention.rs, balanced_deal): the fewest-chunk runs, with part of one
run of the busiest warpgroup moved to another (23 at ViT).
"""
import functools
import itertools
import math
import sys


def first_hidden(n, c):
    """First hidden key of each position, in position order."""
    p = n - c
    a = [c] * (c + p)
    for q in range(p):
        a += [c + q, c + q + 1]
    return a


def main():
    n, c = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) >= 3 else (197, 50)
    step = int(sys.argv[3]) if len(sys.argv) >= 4 else 4
    p, lk = n - c, 2 * n - c
    a = first_hidden(n, c)
    visible = len(a) * n

    # Forward and dQ: a 32-key chunk is skipped when it lies inside every row's hidden window.
    fwd = 0
    for r0 in range(0, len(a), 64):
        lo, hi = min(a[r0:r0 + 64]), max(a[r0:r0 + 64])
        fwd += sum(1 for k0 in range(0, lk, 32) if not (k0 >= hi and min(k0 + 32, lk) <= lo + p))
    print(f"N {n}, C {c}: {len(a)} rows, {lk} keys, {visible} visible pairs")
    print(f"forward / dQ: {fwd} chunks of 64 x 32, {fwd * 2048 / visible:.3f}x the visible pairs")

    # dK/dV: position chunk j (positions 32j..32j+31, first hidden keys lo..hi) is live for the keys
    # [s, e) when some of its rows sees one of them. Every value between lo and hi is some row's.
    chunks = [(min(a[i:i + 32]), max(a[i:i + 32])) for i in range(0, len(a), 32)]

    @functools.lru_cache(maxsize=None)
    def live(s, e):
        return sum(1 for lo, hi in chunks if s < hi or e - 1 >= lo + p)

    tiles = math.ceil(lk / 64)
    now = [live(k, min(k + 64, lk)) for k in range(0, lk, 64)]
    print(f"dK/dV now: tiles of 64 keys from 0, live chunks {now} = {sum(now)}, "
          f"{sum(now) * 2048 / visible:.3f}x the visible pairs")

    @functools.lru_cache(maxsize=None)
    def fewest(s, t):
        if s == lk:
            return 0, ()
        if t == 0:
            return math.inf, ()
        best = (math.inf, ())
        for e in range(s + 1, min(lk, s + 64) + 1):
            cost, rest = fewest(e, t - 1)
            if cost + live(s, e) < best[0]:
                best = (cost + live(s, e), ((s, e),) + rest)
        return best

    cost, runs = fewest(0, tiles)
    print(f"fewest chunks over all splits into {tiles} runs of at most 64 keys: {cost}, runs {list(runs)}")

    def busiest(costs):
        """The smallest possible load of the busiest of 3 warpgroups taking these tiles."""
        best = math.inf
        for deal in itertools.product(range(3), repeat=len(costs)):
            loads = [0, 0, 0]
            for cost_, w in zip(costs, deal):
                loads[w] += cost_
            best = min(best, max(loads))
        return best

    print(f"busiest warpgroup now: {busiest(now)}")
    ends = sorted(set(range(step, lk, step)) | {lk})
    best = (math.inf, None)

    def splits(s, t, acc):
        nonlocal best
        if s == lk:
            costs = [live(x, y) for x, y in acc]
            if math.ceil(sum(costs) / 3) < best[0]:
                load = busiest(costs)
                if load < best[0]:
                    best = (load, list(acc), costs)
            return
        for e in ends:
            if s < e <= s + 64 and lk - e <= 64 * (t - 1):
                acc.append((s, e))
                splits(e, t - 1, acc)
                acc.pop()

    splits(0, tiles, [])
    print(f"busiest warpgroup, best split with run ends at multiples of {step}: {best[0]} "
          f"(runs {best[1]}, live chunks {best[2]})")

    def one_move(costs):
        """The busiest of 3 warpgroups over every deal, with part of one tile of the busiest moved
        to another warpgroup (as evenly as that tile allows), as balanced_deal searches."""
        best_ = math.inf
        for deal in itertools.product(range(3), repeat=len(costs)):
            loads = [0, 0, 0]
            for cost_, w in zip(costs, deal):
                loads[w] += cost_
            m = max(range(3), key=lambda w: (loads[w], -w))
            best_ = min(best_, loads[m])
            for cost_, w in zip(costs, deal):
                for to in range(3):
                    if w != m or to == m or cost_ < 2 or loads[to] >= loads[m]:
                        continue
                    moved = min(max((loads[m] - loads[to]) // 2, 1), cost_ - 1)
                    after = list(loads)
                    after[m] -= moved
                    after[to] += moved
                    best_ = min(best_, max(after))
        return best_

    fewest_costs = [live(x, y) for x, y in runs]
    print(f"busiest warpgroup, wgmma-balanced (those runs, part of one moved): {one_move(fewest_costs)}")


if __name__ == "__main__":
    main()
