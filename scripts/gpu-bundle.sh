#!/usr/bin/env bash
# Builds everything a GPU host needs to check and time the project, with no Rust toolchain and
# no network there: release test binaries, criterion benches and the `mapet` binary, with kernels,
# packed with one run.sh into gpu-bundle/ (ignored by git). Copy that folder (or the repository
# with it) to the GPU host and run `bash gpu-bundle/run.sh` from the repository root.
#
# The binaries are packed as one payload.tar.xz: each of them embeds the same fatbins and much of
# the same code, which xz's large window stores once (about 200 MiB unpacked, ~20 MiB packed),
# so the folder fits a 64 MiB transfer. run.sh unpacks it into a temporary folder.
#
# run.sh runs the test binaries that hold GPU tests with MAPET_REQUIRE_GPU=1 (a GPU test fails
# instead of skipping), then short criterion runs of every bench, then the PyTorch peers if
# gpu-bundle/peers exists and MAPET_PEERS=1. Full logs go to $MAPET_RESULTS (default gpu-bundle/results); a summary table is
# printed last.
#
# MAPET_BASE_REV=<commit> also builds, from that commit's tree (a temporary git worktree, in this
# tree's target folder, whose dependencies it shares), the benches named in MAPET_BASE_BENCHES
# (default "attention"), packed as benches-base/ beside this build's: run.sh's MAPET_AB then
# times both in one call, alternated, so that a change made without a card is measured against
# the code the last card ran, on the same card, with the drift between calls and cards out of
# the comparison. An entry BENCH@COMMIT builds
# that bench at COMMIT instead (e.g. MAPET_BASE_BENCHES="attention@<a> patch_embed@<b>": each op
# against the last commit a card timed it at).
#
# MAPET_BISECT_REVS="<commit> ..." (oldest first) also packs, per commit, the test binaries named
# in MAPET_BISECT_TESTS (default "attention_gpu patch_embed") built at that commit, for run.sh to
# find the first commit at which a test that fails here fails (run.sh, MAPET_BISECT).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="$root/gpu-bundle"
export MAPET_REQUIRE_KERNELS=1
# Smaller binaries: the bundle must stay well under the 64 MiB a transfer allows.
export CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=symbols
export CARGO_PROFILE_BENCH_DEBUG=0 CARGO_PROFILE_BENCH_STRIP=symbols

# The worktrees of MAPET_BASE_REV and MAPET_BISECT_REVS have no toolchain folder of their own.
# They build in this tree's target folder: the same dependencies at the same versions and flags
# are compiled once for all of them (the crate itself, at another path, gets artifacts of its own).
if [ -z "${NVCC:-}" ] && [ -x "$root/.cuda-toolchain/cuda/bin/nvcc" ]; then
  export NVCC="$root/.cuda-toolchain/cuda/bin/nvcc"
fi
# Nor a target folder: one fatbin cache (build.rs) for every tree built here, so that a kernel
# file that is the same at two commits is compiled once.
export MAPET_NVCC_CACHE="${MAPET_NVCC_CACHE:-$root/target/nvcc-cache}"
rm -rf "$out"
final="$out"
out="$out/payload"
mkdir -p "$out/tests" "$out/benches" "$out/bin"

list_executables() {
  python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        kinds = m["target"]["kind"]
        print(m["target"]["name"], ",".join(kinds), m["executable"])
'
}

echo "building release tests" >&2
cargo test --workspace --release --no-run --message-format=json 2>/dev/null | list_executables |
  while read -r name kinds exe; do
    case "$kinds" in
      bin) continue ;;
      lib) cp "$exe" "$out/tests/lib-$name" ;;
      *) cp "$exe" "$out/tests/$name" ;;
    esac
  done
echo "building benches" >&2
cargo bench --workspace --no-run --message-format=json 2>/dev/null | list_executables |
  while read -r name kinds exe; do
    if [ "$kinds" = "bench" ]; then cp "$exe" "$out/benches/$name"; fi
  done
echo "building the mapet binary" >&2
cargo build --release -p mapet-trainer
cp target/release/mapet "$out/bin/mapet"
cp scripts/ncu-hot.py "$out/bin/ncu-hot.py"
if [ -d "$root/../shared/peers" ]; then
  cp -r "$root/../shared/peers" "$out/peers"
fi
if [ -n "${MAPET_BASE_REV:-}" ]; then
  rev="$(git -C "$root" rev-parse --verify "$MAPET_BASE_REV^{commit}")" || {
    echo "error: MAPET_BASE_REV=$MAPET_BASE_REV is not a commit of this repository" >&2
    exit 2
  }
  mkdir -p "$out/benches-base"
  : >"$out/base-rev.txt"
  for entry in ${MAPET_BASE_BENCHES:-attention}; do
    b="${entry%%@*}"
    at="$rev"
    if [ "$entry" != "$b" ]; then
      at="$(git -C "$root" rev-parse --verify "${entry#*@}^{commit}")" || {
        echo "error: MAPET_BASE_BENCHES names $entry, whose commit is not in this repository" >&2
        exit 2
      }
    fi
    echo "building the base bench $b at $at" >&2
    base_tree="$(mktemp -d)"
    git -C "$root" worktree add --detach "$base_tree" "$at" >/dev/null
    (cd "$base_tree" && CARGO_TARGET_DIR="$root/target" cargo bench --no-run --bench "$b" --message-format=json \
      2>/dev/null) | list_executables | while read -r name kinds exe; do
      if [ "$kinds" = "bench" ]; then cp "$exe" "$out/benches-base/$name"; fi
    done
    git -C "$root" worktree remove --force "$base_tree"
    [ -x "$out/benches-base/$b" ] || { echo "error: no bench $b at $at" >&2; exit 2; }
    echo "$b@$(git -C "$root" rev-parse --short=7 "$at")" >>"$out/base-rev.txt"
  done
  # One line: run.sh prints it as the A/B's base.
  tr '\n' ' ' <"$out/base-rev.txt" | sed 's/ $//' >"$out/base-rev.tmp" && mv "$out/base-rev.tmp" "$out/base-rev.txt"
  git -C "$root" rev-parse HEAD >"$out/head-rev.txt"
fi
if [ -n "${MAPET_BISECT_REVS:-}" ]; then
  # One build of the test binaries in MAPET_BISECT_TESTS (default "attention_gpu patch_embed") at
  # each commit of MAPET_BISECT_REVS, oldest first, into tests-at/NN-REV/: when one of those
  # binaries fails at this build, run.sh runs its failed tests at each of these commits in turn, so
  # the call that finds a fault also names the commit that brought it. Builds are kept in
  # target/bisect/REV (a commit's binaries never change), so a later bundle reuses them.
  read -ra bisect_tests <<<"${MAPET_BISECT_TESTS:-attention_gpu patch_embed}"
  n=0
  for r in $MAPET_BISECT_REVS; do
    rev="$(git -C "$root" rev-parse --verify "$r^{commit}")" || {
      echo "error: MAPET_BISECT_REVS names $r, not a commit of this repository" >&2
      exit 2
    }
    short="$(git -C "$root" rev-parse --short=7 "$rev")"
    keep="$root/target/bisect/$rev"
    # The binaries this commit still lacks, built in one cargo call from one worktree (the
    # crate and its kernels once a commit, not once a test). cargo's messages go to a log there;
    # a failed build leaves the worktree removed and names the missing binaries below.
    missing=()
    for t in "${bisect_tests[@]}"; do
      [ -x "$keep/$t" ] || missing+=(--test "$t")
    done
    if [ ${#missing[@]} -gt 0 ]; then
      echo "building tests ${missing[*]} at $short" >&2
      tree="$(mktemp -d)"
      git -C "$root" worktree add --detach "$tree" "$rev" >/dev/null
      mkdir -p "$keep"
      (cd "$tree" && CARGO_TARGET_DIR="$root/target" cargo test --release --no-run "${missing[@]}" \
        --message-format=json 2>"$keep/build.log") | list_executables | while read -r name kinds exe; do
        for t in "${bisect_tests[@]}"; do
          if [ "$name" = "$t" ]; then cp "$exe" "$keep/$t"; fi
        done
      done || true
      git -C "$root" worktree remove --force "$tree"
    fi
    for t in "${bisect_tests[@]}"; do
      [ -x "$keep/$t" ] || { echo "error: no test binary $t at $short (cargo's messages: $keep/build.log)" >&2; exit 2; }
    done
    n=$((n + 1))
    dir="$out/tests-at/$(printf '%02d' "$n")-$short"
    mkdir -p "$dir"
    for t in "${bisect_tests[@]}"; do cp "$keep/$t" "$dir/$t"; done
    git -C "$root" log -1 --format='%h %s' "$rev" | cut -c1-100 >"$dir/commit.txt"
  done
fi
# The test binaries that hold GPU tests (their source calls gpu_or_skip): run.sh's default list.
grep -l "gpu_or_skip" tests/*.rs trainer/tests/*.rs | xargs -n1 basename | sed 's/\.rs$//' |
  while read -r t; do [ -e "$out/tests/$t" ] && echo "$t"; done | tr '\n' ' ' >"$out/gpu-tests.txt"
echo "GPU test binaries: $(cat "$out/gpu-tests.txt")" >&2
ls -la "$out/tests" "$out/benches" >&2
echo "packing" >&2
tar -C "$out" -cf - . | xz -T0 -9 >"$final/payload.tar.xz"
rm -rf "$out"
cp scripts/gpu-run.sh "$final/run.sh"
du -sh "$final" >&2
