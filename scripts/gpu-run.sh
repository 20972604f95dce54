#!/usr/bin/env bash
# Runs on the GPU host from the repository root: `bash gpu-bundle/run.sh`. Copied into the bundle
# by scripts/gpu-bundle.sh. Environment:
#   MAPET_RESULTS   folder for full logs (default gpu-bundle/results)
#   MAPET_RESULTS_TAR  also pack that folder into this .tar.gz at the end (one file to copy back)
#   MAPET_TESTS     space-separated test binary names to run (default: those with GPU tests, as
#                   listed by scripts/gpu-bundle.sh in gpu-tests.txt; "all" runs every binary,
#                   "none" skips them)
#   MAPET_BENCHES   space-separated bench names to run (default: all; "none" skips)
#   MAPET_TEST_ARGS extra arguments for every test binary (say --nocapture, to keep the errors
#                   the tests print)
#   MAPET_TEST_TIMEOUT  seconds each test binary may run (default 300; a check whose kernels do not
#                   finish within 20 s ends its binary sooner, with a HUNG line naming the launch)
#   MAPET_RETRY_FAILED  failed tests of a binary to run again one by one (default 12; 0: none)
#   MAPET_BENCH_WARMUP, MAPET_BENCH_TIME  criterion warm-up and measurement seconds (default 1, 2)
#   MAPET_BENCH_FILTER  criterion filter passed to every bench (default: all benchmarks)
#   MAPET_PEERS=1   also run the PyTorch peers (needs python3 with torch)
#   MAPET_AB=N      after the benches: N rounds of each bench in MAPET_AB_BENCHES (default: all
#                   those the bundle has at its base commit, MAPET_BASE_REV of gpu-bundle.sh)
#                   against the same bench of this build, base and head alternated as ABBA
#                   (base head, head base, ...) so that a drift over the call falls on both
#                   alike; each run with the criterion filter MAPET_AB_FILTER (default: one that
#                   matches nothing, which leaves the benches' own RESULT lines, the medians of 50
#                   timed calls) and MAPET_BENCH_WARMUP/TIME; then, per RESULT line, the median
#                   over the rounds of each side and head / base, into $MAPET_RESULTS/ab-BENCH.txt
#                   and the summary
#   MAPET_BISECT=0  when a test binary fails and the bundle holds it built at earlier commits
#                   (gpu-bundle.sh's MAPET_BISECT_REVS), its failed tests are run at each of
#                   them, oldest first, and the first commit where they fail is named; 0 skips this
#   MAPET_SANITIZE  space-separated test binary names to run again under compute-sanitizer,
#                   when it is installed and can see the device, once per tool in
#                   MAPET_SANITIZE_TOOLS (default "memcheck"; also racecheck, synccheck,
#                   initcheck), with MAPET_SANITIZE_ARGS as the test binary's arguments (say a test
#                   name, to keep a slow tool to one test), each run at most
#                   MAPET_SANITIZE_TIMEOUT seconds (default 400)
#   MAPET_MODEL_BENCH=1  `mapet bench` of ViT-B at batch 128 on the GPU, once per patch-embedding
#                   pixel order (MAPET_PATCH_EMBED_ORDER) in MAPET_MODEL_BENCH_CONFIGS (default
#                   "hwc-ws-raw hwc", the default on an H100/H200 and the mma.sync one;
#                   "hwc-ws/hwc" runs the hwc-ws forward with the hwc backward) and
#                   attention kernel set (MAPET_ATTENTION_KERNELS) in
#                   MAPET_MODEL_BENCH_ATTENTION (default "wgmma resident"; "wgmma/resident" runs
#                   the wgmma forward with the resident backward) and GEMM
#                   tuning (MAPET_GEMM_TUNE) in MAPET_MODEL_BENCH_TUNE (default: the variable's
#                   value, else 0; "0 1" runs both) and programmatic dependent launches
#                   (MAPET_DEPENDENT_LAUNCH) in MAPET_MODEL_BENCH_DEPENDENT (likewise; "0 1" both),
#                   logs into $MAPET_RESULTS, with the SM clock and power sampled by
#                   nvidia-smi during each run (clocks-*.csv and a summary row)
#   MAPET_WINNERS=1  after the benches: for attention, the patch embedding and the cross-entropy,
#                   the fastest variant in the RESULT lines (forward/backward pairs included) among
#                   those whose tests passed in this run, kept only if more than 1% faster than the
#                   default; written as run-time switches to $MAPET_RESULTS/winners.env; then the
#                   test binaries in MAPET_WINNERS_TESTS (default "model_gpu model_cuda_train") run
#                   with those switches, and `mapet bench` of ViT-B with the defaults and with them
#   MAPET_PRETRAIN_BENCH=1  end to end on local disk: `mapet synth` (MAPET_SYNTH_IMAGES, default
#                   3072 JPEGs), `mapet bench-data` on them, then one epoch of `mapet pretrain` of
#                   ViT-B at batch 128 on the GPU; the median images/s of its steps after the third
#   MAPET_NCU_CE=1  every launch's duration over about one call of the codebook cross-entropy
#                   (ncu, clocks left alone), into $MAPET_RESULTS
#   MAPET_NCU_STEP=1  every kernel's duration over two ViT-B training steps (ncu, clocks left
#                   alone), summed per kernel, into $MAPET_RESULTS/ncu-step-summary.txt
#   MAPET_NCU=1     profile the attention (ViT-B) and patch-embedding (B = 128) kernels with Nsight
#                   Compute (ncu, clocks left alone): speed of light, occupancy, warp stalls, into
#                   $MAPET_RESULTS; per kernel also its SASS with the warp-stall samples of each
#                   instruction (ncu-NAME-sass.csv.gz) and their digest (ncu-NAME-hot.txt: the
#                   opcodes and instructions the warps wait at most)
set -uo pipefail
bundle="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
res="${MAPET_RESULTS:-$bundle/results}"
# The binaries travel packed (scripts/gpu-bundle.sh); unpack them once per host.
here="${TMPDIR:-/tmp}/mapet-bundle"
if [ ! -d "$here/tests" ] || [ "$bundle/payload.tar.xz" -nt "$here/tests" ]; then
  rm -rf "$here" && mkdir -p "$here" && xz -dc "$bundle/payload.tar.xz" | tar -C "$here" -xf - || {
    echo "cannot unpack $bundle/payload.tar.xz" >&2
    exit 1
  }
fi
mkdir -p "$res"
echo "== run.sh $(date -u +%H:%M:%S) tests=${MAPET_TESTS:-default} benches=${MAPET_BENCHES:-all}" >>"$res/summary.txt"
export MAPET_REQUIRE_GPU=1 MAPET_ROOT="${MAPET_ROOT:-$PWD}" CRITERION_HOME="$res/criterion"
# Tests that run the `mapet` binary find it here rather than in the build's target folder.
export MAPET_BIN="$here/bin/mapet"
# cuBLASLt is loaded at run time; make sure the loader finds it where CUDA installs it.
if ! ldconfig -p 2>/dev/null | grep -q libcublasLt.so; then
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -e "$d/libcublasLt.so.13" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  done
fi
summary=()
# A test log's last "test result" line, less its verdict and time: "12 passed; 0 failed; ...".
test_counts() {
  grep -E '^test result:' "$1" | tail -n 1 | sed -E 's/test result: [a-zA-Z]+\. //; s/; finished.*//'
}
# The timed ViT-B training step the model benches run.
vit_b_bench() {
  timeout 300 "$here/bin/mapet" bench --model vit-b --batch 128 --steps 20 --warmup 3 --device cuda
}
# Each row also lands in $res/summary.txt as it is made, so a run cut short still says how far it got.
row() {
  summary+=("$(printf '%-34s %-8s %s' "$1" "$2" "$3")")
  printf '%s\n' "${summary[-1]}" >>"$res/summary.txt"
}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
} | tee "$res/device.txt"

# Each test binary's exit status, and whether attention passed without its wgmma set: which
# variants MAPET_WINNERS may choose from.
declare -A test_rc=()
attention_without_wgmma_rc=""
patch_orders_ok=""
tests="${MAPET_TESTS:-$(cat "$here/gpu-tests.txt" 2>/dev/null || ls "$here/tests")}"
[ "$tests" = "all" ] && tests="$(ls "$here/tests")"
[ "$tests" = "none" ] && tests=""
for t in $tests; do
  log="$res/test-$t.log"
  start=$(date +%s.%N)
  timeout "${MAPET_TEST_TIMEOUT:-300}" "$here/tests/$t" --test-threads=1 ${MAPET_TEST_ARGS:-} >"$log" 2>&1
  rc=$?
  test_rc[$t]=$rc
  secs=$(python3 -c "print(f'{$(date +%s.%N)-$start:.1f}s')" 2>/dev/null || echo "?")
  counts=$(test_counts "$log")
  if [ $rc -eq 0 ]; then row "test $t" ok "$counts $secs"; else row "test $t" FAIL "rc=$rc $counts (see $log)"; fi
  # A kernel fault is sticky: every later test of the same process fails with it. So each failed
  # test runs again alone (up to MAPET_RETRY_FAILED of them, default 12; 0 turns this off), to
  # say which tests fail by themselves and which only after another's fault.
  if [ $rc -ne 0 ]; then
    while IFS= read -r name; do
      one="$res/test-$t-alone-${name//[^A-Za-z0-9_]/_}.log"
      timeout 120 "$here/tests/$t" --exact "$name" --test-threads=1 ${MAPET_TEST_ARGS:-} >"$one" 2>&1
      if [ $? -eq 0 ]; then row "  alone $t::$name" ok "passes by itself"; else row "  alone $t::$name" FAIL "$one"; fi
    done < <(grep -E '^test .* \.\.\. FAILED$' "$log" | sed -E 's/^test (.*) \.\.\. FAILED$/\1/' |
      head -n "${MAPET_RETRY_FAILED:-12}")
    # The bundle may hold this binary built at earlier commits (gpu-bundle.sh's
    # MAPET_BISECT_REVS, oldest first): the failed tests run at each, to name the first commit
    # at which they fail. MAPET_BISECT=0 leaves this out.
    failed=$(grep -E '^test .* \.\.\. FAILED$' "$log" | sed -E 's/^test (.*) \.\.\. FAILED$/\1/' | tr '\n' ' ')
    if [ "${MAPET_BISECT:-1}" != 0 ] && [ -n "$failed" ] && compgen -G "$here/tests-at/*/$t" >/dev/null; then
      first=""
      for bin in "$here"/tests-at/*/"$t"; do
        at="$(basename "$(dirname "$bin")")"
        one="$res/test-$t-at-$at.log"
        # shellcheck disable=SC2086  # the failed tests' names, one argument each
        timeout "${MAPET_TEST_TIMEOUT:-300}" "$bin" --exact $failed --test-threads=1 ${MAPET_TEST_ARGS:-} >"$one" 2>&1
        brc=$?
        what="$(cat "$(dirname "$bin")/commit.txt" 2>/dev/null | cut -c1-60)"
        if [ $brc -ne 0 ]; then
          row "  bisect $t at $at" FAIL "rc=$brc $(test_counts "$one"): $what"
          [ -z "$first" ] && first="$at"
        elif grep -qE '^test result: ok\. 0 passed' "$one"; then
          row "  bisect $t at $at" skip "none of the failed tests there: $what"
        else
          row "  bisect $t at $at" ok "$(test_counts "$one"): $what"
        fi
      done
      row "  bisect $t" "" "first failing: ${first:-none of the bundled commits (so a later one)}"
    fi
    # The attention tests check every kernel set in turn; whether the others pass without the
    # wgmma set.
    if [ "$t" = attention_gpu ]; then
      one="$res/test-$t-without-wgmma.log"
      MAPET_TEST_ATTENTION_SETS=tiled,resident timeout "${MAPET_TEST_TIMEOUT:-300}" "$here/tests/$t" \
        --test-threads=1 ${MAPET_TEST_ARGS:-} >"$one" 2>&1
      attention_without_wgmma_rc=$?
      if [ $attention_without_wgmma_rc -eq 0 ]; then row "  $t tiled,resident only" ok "pass"; else row "  $t tiled,resident only" FAIL "$one"; fi
      # A wgmma kernel that hung (the test's HUNG line) would end the attention bench at its
      # first launch, so the bench leaves that set out.
      if grep -q '^HUNG .*wgmma' "$log"; then
        export MAPET_BENCH_ATTENTION_SETS=tiled,resident
        row "  $t wgmma hung" skip "attention bench without wgmma: $(grep -m1 '^HUNG' "$log" | cut -c1-120)"
      fi
    fi
    # The patch-embedding tests check every pixel order in turn: which pass on their own
    # (MAPET_TEST_PATCH_ORDERS; the f32 entry runs with chw). Those still count for the targets
    # and the winners, and the bench runs only them, so that a fault or hang of another cannot
    # fail or end it.
    if [ "$t" = patch_embed ]; then
      for o in hwc hwc-ws chw hwc-ws-raw; do
        one="$res/test-$t-only-$o.log"
        MAPET_TEST_PATCH_ORDERS=$o timeout "${MAPET_TEST_TIMEOUT:-300}" "$here/tests/$t" --test-threads=1 \
          ${MAPET_TEST_ARGS:-} >"$one" 2>&1
        if [ $? -eq 0 ]; then
          patch_orders_ok="$patch_orders_ok $o"
          row "  $t $o only" ok "pass"
        else
          row "  $t $o only" FAIL "$one"
        fi
      done
      if [ -n "$patch_orders_ok" ]; then
        MAPET_BENCH_PATCH_ORDERS="$(echo $patch_orders_ok | tr ' ' ',')"
        export MAPET_BENCH_PATCH_ORDERS
        row "  $t orders passing alone" skip "patch bench with $MAPET_BENCH_PATCH_ORDERS only"
      fi
    fi
  fi
done

# The variants each op's tests cleared in this run (for the target rows and MAPET_WINNERS): all
# of an op's when its test binary passed; for attention, the sets without wgmma when only those
# passed on their own; for the patch embedding, the orders that passed on their own; none when
# its tests failed; the defaults, verified by earlier runs, when its tests did not run in this
# call. The cross-entropy's default is always counted (its tests cover the variants too); its
# sub-chunk passes need its tests, its chosen or self-tuned GEMMs the GEMM tests too.
export OK_ATTENTION="resident wgmma" OK_PATCH="hwc hwc-ws" OK_CE="default"
if [ "${test_rc[attention_gpu]:-x}" = 0 ]; then OK_ATTENTION="tiled resident wgmma wgmma-peek wgmma-persistent wgmma-balanced"
elif [ "$attention_without_wgmma_rc" = 0 ]; then OK_ATTENTION="tiled resident"
elif [ -n "${test_rc[attention_gpu]:-}" ]; then OK_ATTENTION=""; fi
if [ "${test_rc[patch_embed]:-x}" = 0 ]; then OK_PATCH="chw hwc hwc-ws hwc-ws-raw"
elif [ -n "$patch_orders_ok" ]; then OK_PATCH="${patch_orders_ok# }"
elif [ -n "${test_rc[patch_embed]:-}" ]; then OK_PATCH=""; fi
[ "${test_rc[cross_entropy]:-x}" = 0 ] && OK_CE="default passes"
[ "${test_rc[cross_entropy]:-x}" = 0 ] && [ "${test_rc[gemm]:-x}" = 0 ] && OK_CE="default passes gemms"

for t in ${MAPET_SANITIZE:-}; do
  for tool in ${MAPET_SANITIZE_TOOLS:-memcheck}; do
    log="$res/sanitize-$tool-$t.log"
    if ! command -v compute-sanitizer >/dev/null; then row "$tool $t" skip "no compute-sanitizer"; continue; fi
    timeout "${MAPET_SANITIZE_TIMEOUT:-400}" compute-sanitizer --tool "$tool" --error-exitcode 9 "$here/tests/$t" --test-threads=1 \
      ${MAPET_SANITIZE_ARGS:-} ${MAPET_TEST_ARGS:-} >"$log" 2>&1
    rc=$?
    errs=$(grep -m1 -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" || echo "no summary")
    if [ $rc -eq 0 ]; then row "$tool $t" ok "$errs"; else row "$tool $t" FAIL "rc=$rc $errs (see $log)"; fi
  done
done

# SM clock and board power every 100 ms while a command runs, into $1 (csv), and their medians
# afterwards: a step that runs slower than the sum of its kernels' isolated (ncu) times may be
# running at a lower clock under sustained load rather than leaving the GPU idle.
clocks_during() {
  local csv="$1"
  shift
  local sampler=""
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=clocks.sm,power.draw --format=csv,noheader,nounits -lms 100 >"$csv" 2>/dev/null &
    sampler=$!
  fi
  "$@"
  local rc=$?
  [ -n "$sampler" ] && kill "$sampler" 2>/dev/null && wait "$sampler" 2>/dev/null
  return $rc
}
clock_medians() {
  python3 -c '
import statistics, sys
rows = [l.split(",") for l in open(sys.argv[1]) if l.count(",") == 1]
busy = [(float(c), float(p)) for c, p in rows if float(p) > 150]  # samples under load
if busy:
    print(f"SM clock median {statistics.median(c for c, _ in busy):.0f} MHz (min {min(c for c, _ in busy):.0f}),"
          f" power median {statistics.median(p for _, p in busy):.0f} W over {len(busy)} loaded samples")
else:
    print("no loaded samples")' "$1" 2>/dev/null || echo "no clock samples"
}

if [ "${MAPET_MODEL_BENCH:-0}" = "1" ]; then
  for order in ${MAPET_MODEL_BENCH_CONFIGS:-hwc-ws-raw hwc}; do
    for attn in ${MAPET_MODEL_BENCH_ATTENTION:-wgmma resident}; do
      for tune in ${MAPET_MODEL_BENCH_TUNE:-${MAPET_GEMM_TUNE:-0}}; do
      for dep in ${MAPET_MODEL_BENCH_DEPENDENT:-${MAPET_DEPENDENT_LAUNCH:-0}}; do
        # "fwd/bwd" (e.g. wgmma/resident) runs the forward and the backward on different sets.
        # The same for the patch embedding's orders (e.g. hwc-ws/hwc).
        fwd_set=${attn%%/*}
        bwd_set=${attn#*/}
        fwd_order=${order%%/*}
        bwd_order=${order#*/}
        tag="${order//\//-}-${attn//\//-}"
        [ "$tune" = "1" ] && tag="$tag-tuned"
        [ "$dep" = "1" ] && tag="$tag-dependent"
        log="$res/mapet-bench-vit-b-$tag.log"
        MAPET_PATCH_EMBED_ORDER=$fwd_order MAPET_PATCH_EMBED_BACKWARD_ORDER=$bwd_order \
          MAPET_ATTENTION_KERNELS=$fwd_set MAPET_ATTENTION_BACKWARD_KERNELS=$bwd_set \
          MAPET_GEMM_TUNE=$tune MAPET_DEPENDENT_LAUNCH=$dep clocks_during "$res/clocks-vit-b-$tag.csv" \
          vit_b_bench >"$log" 2>&1
        rc=$?
        name="mapet bench vit-b $tag"
        if [ $rc -eq 0 ]; then row "$name" ok "$(grep -m1 -i 'images/s' "$log")"; else row "$name" FAIL "rc=$rc (see $log)"; fi
        row "clocks vit-b $tag" "" "$(clock_medians "$res/clocks-vit-b-$tag.csv")"
      done
      done
    done
  done
fi

if [ "${MAPET_PRETRAIN_BENCH:-0}" = "1" ]; then
  synth="${TMPDIR:-/tmp}/mapet-synth"
  log="$res/pretrain-bench.log"
  {
    # (A set without its token file was cut short: made again from scratch.)
    [ -f "$synth/tokens.npy" ] || { rm -rf "$synth" && "$here/bin/mapet" synth --out "$synth" --images "${MAPET_SYNTH_IMAGES:-3072}"; }
    "$here/bin/mapet" bench-data --data "$synth/images" --threads 1,2,4,8,16 --images 1024
    rm -rf "$res/pretrain-run"
    timeout 400 "$here/bin/mapet" pretrain --data "$synth/images" --tokens "$synth/tokens.npy" \
      --out "$res/pretrain-run" --device cuda --batch 128 --epochs 1 --set model.preset=vit-b \
      --set output.checkpoint_every=0 --set data.eval_fraction=0 --set train.warmup_epochs=0.5
  } >"$log" 2>&1
  rc=$?
  ips=$(python3 -c '
import csv, statistics, sys
r = [float(x["images_per_s"]) for x in csv.DictReader(open(sys.argv[1]))][3:]
print(f"{statistics.median(r):.1f}" if r else "none")' "$res/pretrain-run/metrics.csv" 2>/dev/null || echo "?")
  row "pretrain vit-b (synthetic)" "rc=$rc" "median $ips images/s; loader: see $log"
fi

if [ "${MAPET_NCU:-0}" = "1" ]; then
  # Three launches of each named kernel (ViT-B shape for attention, B = 128 for the patch
  # embedding: the first shapes the benches time), after two warm-up launches of it (or as many as
  # the entry's fifth field says: the cross-entropy's register row kernel first runs the forward
  # alone, 23 calls of six chunks, before its training launches); the clocks
  # are left as they are. One ncu run per kernel, matched by its exact name, so that the kernels
  # a bench launches first do not use up the count. The stall-reason metrics (percent of a
  # warp's active cycles) say what the warps wait on. MAPET_NCU_KERNELS overrides the list
  # ("log:bench:kernel:criterion filter[:launches skipped]" entries).
  # The default list: the kernels the defaults run on an H100/H200 (wgmma attention, the
  # hwc-ws-raw patch-embedding forward with the hwc-ws weight gradient), then the others.
  specs="${MAPET_NCU_KERNELS:-attn-fwd-wgmma:attention:mapet_attention_fwd_wgmma:attention/vit-b/wgmma \
    attn-dq-wgmma:attention:mapet_attention_bwd_dq_wgmma:attention/vit-b/wgmma \
    attn-dkdv-wgmma:attention:mapet_attention_bwd_dkdv_wgmma:attention/vit-b/wgmma \
    patch-fwd-hwc-ws-raw:patch_embed:mapet_patch_embed_fwd_u8_hwc_ws_raw:patch_embed_gpu \
    patch-bwd-weight-hwc-ws:patch_embed:mapet_patch_embed_bwd_weight_u8_hwc_ws:patch_embed_gpu \
    patch-tokens:patch_embed:mapet_patch_embed_bwd_tokens:patch_embed_gpu \
    ce-rows-held:cross_entropy:cross_entropy_rows_held:cross_entropy_gpu:150 \
    attn-dkdv-wgmma-peek:attention:mapet_attention_bwd_dkdv_wgmma_peek:attention/vit-b/wgmma-peek \
    attn-dkdv-wgmma-fused:attention:mapet_attention_bwd_dkdv_wgmma_fused:attention/vit-b/wgmma-fused \
    attn-fwd-wgmma-persistent:attention:mapet_attention_fwd_wgmma_persistent:attention/vit-b/wgmma-persistent \
    attn-dkdv-wgmma-balanced:attention:mapet_attention_bwd_dkdv_wgmma_balanced:attention/vit-b/wgmma-balanced \
    attn-fwd-resident:attention:mapet_attention_fwd_resident:attention/vit-b/resident \
    attn-dq-resident:attention:mapet_attention_bwd_dq_resident:attention/vit-b/resident \
    attn-dkdv-resident:attention:mapet_attention_bwd_dkdv_resident:attention/vit-b/resident \
    attn-fwd-tiled:attention:mapet_attention_fwd:attention/vit-b/tiled \
    patch-fwd-hwc:patch_embed:mapet_patch_embed_fwd_u8_hwc:patch_embed_gpu \
    patch-fwd-hwc-ws:patch_embed:mapet_patch_embed_fwd_u8_hwc_ws:patch_embed_gpu \
    patch-bwd-weight-hwc:patch_embed:mapet_patch_embed_bwd_weight_u8_hwc:patch_embed_gpu}"
  for spec in $specs; do
    IFS=: read -r name bench kernel filter skip <<<"$spec"
    log="$res/ncu-$name.log"
    if command -v ncu >/dev/null; then
      # The report goes outside $res (it can run to tens of MB); what comes back is its details
      # page (the log, as before), its SASS with per-instruction samples (gzipped CSV) and
      # ncu-hot.py's digest of that: the instructions the warps wait at most, and on what.
      rep="$here/ncu-$name"
      timeout 180 ncu --clock-control none --kernel-name "$kernel" --launch-skip "${skip:-2}" --launch-count 3 \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section SchedulerStats \
        --section SourceCounters \
        --metrics "regex:smsp__warp_issue_stalled_.*_per_warp_active.pct" --export "$rep" --force-overwrite \
        "$here/benches/$bench" --bench --warm-up-time 0.2 --measurement-time 0.3 "$filter" >"$log" 2>&1
      rc=$?
      if [ -f "$rep.ncu-rep" ]; then
        timeout 60 ncu --import "$rep.ncu-rep" >>"$log" 2>&1
        timeout 60 ncu --import "$rep.ncu-rep" --page source --print-source sass --csv >"$rep-sass.csv" \
          2>"$res/ncu-$name-source.err"
        python3 "$here/bin/ncu-hot.py" "$rep-sass.csv" 40 >"$res/ncu-$name-hot.txt" 2>&1
        gzip -c "$rep-sass.csv" >"$res/ncu-$name-sass.csv.gz"
        rm -f "$rep.ncu-rep" "$rep-sass.csv"
      fi
      # The duration, then the opcode with the most samples ("HGMMA 31.2%").
      hot="$(sed -n '/^samples by opcode:/{n;p;q}' "$res/ncu-$name-hot.txt" 2>/dev/null | awk '{print $1, $3}')"
      row "ncu $name" "rc=$rc" "$(grep -m1 -E '^ +Duration' "$log" | awk '{print $NF, $(NF-1)}')${hot:+; top stall $hot}"
    else
      row "ncu $name" skip "no ncu"
    fi
  done
fi

if [ "${MAPET_NCU_CE:-0}" = "1" ]; then
  # The duration of every launch (cuBLASLt's GEMMs and the project's kernels) over about one
  # forward + backward call of the codebook cross-entropy at R = 18816, D = 768, V = 8192, inside
  # the bench's timing loops: where the time between the three GEMMs goes.
  log="$res/ncu-cross_entropy.log"
  if command -v ncu >/dev/null; then
    timeout 300 ncu --clock-control none --metrics gpu__time_duration.sum --launch-skip 700 --launch-count 120 \
      "$here/benches/cross_entropy" --bench --warm-up-time 0.2 --measurement-time 0.5 cross_entropy_gpu >"$log" 2>&1
    row "ncu cross_entropy" "rc=$?" "$log"
  else
    row "ncu cross_entropy" skip "no ncu"
  fi
fi

if [ "${MAPET_NCU_STEP:-0}" = "1" ]; then
  # The duration of every kernel of two ViT-B training steps at batch 128 (`mapet bench`, one
  # warm-up and one timed step), summed per kernel name: where a step's time goes.
  log="$res/ncu-step.csv"
  if command -v ncu >/dev/null; then
    timeout 300 ncu --clock-control none --csv --metrics gpu__time_duration.sum \
      "$here/bin/mapet" bench --model vit-b --batch 128 --steps 1 --warmup 1 --device cuda >"$log" 2>"$res/ncu-step.err"
    rc=$?
    python3 - "$log" >"$res/ncu-step-summary.txt" 2>&1 <<'PY'
import csv, collections, sys
# The CSV lines are those starting with a quote (the bench's own output is mixed in).
lines = [l for l in open(sys.argv[1]) if l.startswith('"')]
rows = [r for r in csv.DictReader(lines) if r.get("Metric Name") == "gpu__time_duration.sum"]
total, per = 0.0, collections.defaultdict(lambda: [0, 0.0])
for r in rows:
    scale = {"ns": 1, "nsecond": 1, "us": 1e3, "usecond": 1e3, "ms": 1e6, "msecond": 1e6}
    ns = float(r["Metric Value"].replace(",", "")) * scale.get(r["Metric Unit"], 1)
    name = r["Kernel Name"][:90]
    per[name][0] += 1
    per[name][1] += ns
    total += ns
print(f"{len(rows)} launches over 2 steps, {total / 2e6:.2f} ms of kernel time per step")
for name, (n, ns) in sorted(per.items(), key=lambda kv: -kv[1][1])[:40]:
    print(f"{ns / 2e6:9.3f} ms/step {n / 2:7.1f} launches/step  {name}")
PY
    row "ncu training step" "rc=$rc" "$(head -n 1 "$res/ncu-step-summary.txt")"
  else
    row "ncu training step" skip "no ncu"
  fi
fi

benches="${MAPET_BENCHES:-$(ls "$here/benches")}"
if [ "$benches" != "none" ]; then
  for b in $benches; do
    log="$res/bench-$b.log"
    # gemm_tn hung in its test: its bench would only hang again (20 s) before any line.
    if [ "$b" = hopper ] && grep -q '^HUNG' "$res/test-hopper.log" 2>/dev/null; then
      row "bench $b" skip "gemm_tn hung in its test"
      continue
    fi
    timeout 300 "$here/benches/$b" --bench --warm-up-time "${MAPET_BENCH_WARMUP:-1}" \
      --measurement-time "${MAPET_BENCH_TIME:-2}" ${MAPET_BENCH_FILTER:-} >"$log" 2>&1
    rc=$?
    if [ $rc -eq 0 ]; then row "bench $b" ok "$(grep -cE '^[^ ].*time:' "$log") results"; else row "bench $b" FAIL "rc=$rc (see $log)"; fi
    # The benches' own one-line results (median, TFLOP/s, memory), so the summary carries the
    # numbers, and a HUNG line if a kernel hung and ended the bench.
    while IFS= read -r line; do row "  $b" "" "${line#RESULT }"; done < <(grep -E '^(RESULT|HUNG)' "$log" 2>/dev/null)
  done
fi

if [ "${MAPET_AB:-0}" -gt 0 ] 2>/dev/null; then
  if [ ! -d "$here/benches-base" ]; then
    row "ab" skip "the bundle has no base benches (gpu-bundle.sh with MAPET_BASE_REV)"
  else
    row "ab base / head" "" "$(cat "$here/base-rev.txt" 2>/dev/null) / $(cat "$here/head-rev.txt" 2>/dev/null)"
    for b in ${MAPET_AB_BENCHES:-$(ls "$here/benches-base")}; do
      if [ ! -x "$here/benches-base/$b" ] || [ ! -x "$here/benches/$b" ]; then
        row "ab $b" skip "not in both builds"
        continue
      fi
      for ((i = 0; i < MAPET_AB; i++)); do
        if ((i % 2 == 0)); then sides="base head"; else sides="head base"; fi
        for side in $sides; do
          exe="$here/benches/$b"
          [ "$side" = base ] && exe="$here/benches-base/$b"
          timeout 300 "$exe" --bench --warm-up-time "${MAPET_BENCH_WARMUP:-1}" --measurement-time \
            "${MAPET_BENCH_TIME:-2}" "${MAPET_AB_FILTER:-no-criterion-benchmark-has-this-name}" \
            >"$res/ab-$b-$i-$side.log" 2>&1 || row "ab $b round $i $side" FAIL "rc=$? (see $res/ab-$b-$i-$side.log)"
        done
      done
      python3 - "$res" "$b" >"$res/ab-$b.txt" 2>&1 <<'PY'
import glob, re, statistics, sys
res, bench = sys.argv[1], sys.argv[2]
# A RESULT line's first time in ms, per side and round; the line, with that time cut out and the
# other numbers made N, names it.
times = {"base": {}, "head": {}}
for side in times:
    for f in sorted(glob.glob(f"{res}/ab-{bench}-*-{side}.log")):
        for line in open(f, errors="replace"):
            m = re.search(r"([0-9]+\.[0-9]+) ms", line)
            if line.startswith("RESULT ") and m:
                key = (line[7:m.start()].strip() + " ~ " + re.sub(r"[0-9]+(\.[0-9]+)?", "N", line[m.end():].strip()))
                times[side].setdefault(key, []).append(float(m.group(1)))
keys = [k for k in times["head"] if k in times["base"]]
# Shown by the part before the time where that alone tells the lines apart.
heads = [k.split(" ~ ")[0] for k in keys]
shown = {k: h if heads.count(h) == 1 else k for k, h in zip(keys, heads)}
print(f"{'RESULT line':64} {'base ms':>9} {'head ms':>9} {'head/base':>9}  rounds (median of each side)")
for k in keys:
    b, h = statistics.median(times["base"][k]), statistics.median(times["head"][k])
    print(f"{shown[k][:64]:64} {b:9.4f} {h:9.4f} {h / b if b else float('nan'):9.3f}  {len(times['base'][k])}/{len(times['head'][k])}")
for side in times:
    for k in times[side]:
        if k not in keys:
            print(f"only in {side}: {k}")
PY
      row "ab $b" "" "$res/ab-$b.txt"
      # The summary keeps the ViT-B lines (the targets' shapes).
      while IFS= read -r line; do row "  ab $b" "" "$line"; done < <(grep -E 'vit-b|forward\+backward ' "$res/ab-$b.txt" | head -n 12)
    done
  fi
fi

if [ "${MAPET_PEERS:-0}" = "1" ] && [ -d "$here/peers" ]; then
  for p in "bench_anchor.py --parts attn --variants dense,sdpa --out $res/peers" "bench_anchor2.py $res/peers"; do
    mkdir -p "$res/peers"
    (cd "$here/peers" && PYTHONUNBUFFERED=1 timeout 240 python3 $p) >"$res/peer-${p%% *}.log" 2>&1
    row "peer ${p%% *}" "rc=$?" "$res/peers"
  done
fi

# The issues' targets against the best variant each bench printed (a verdict, not a new number:
# every figure comes from a RESULT line above, in $res/bench-*.log). Only a variant whose tests
# passed (OK_*) can meet a target; a faster one that did not is named beside it.
if ls "$res"/bench-*.log >/dev/null 2>&1; then
  while IFS= read -r line; do row "${line%%|*}" "$(cut -d'|' -f2 <<<"$line")" "${line##*|}"; done < <(python3 - "$res" <<'PY'
import glob, os, re, sys
lines = [l.strip() for f in sorted(glob.glob(sys.argv[1] + "/bench-*.log")) for l in open(f, errors="replace")
         if l.startswith("RESULT ")]
ok = {k: os.environ.get(f"OK_{k.upper()}", "").split() for k in ("attention", "patch", "ce")}

def tested(name, variant):
    """Whether the variant's kernels passed their tests in this run."""
    # "(dependent launches)" after an attention or patch variant: the same kernels.
    if name.startswith("target attention"):
        parts = variant.split(" (")[0].split("/")
        return all(p in ok["attention"] for p in (parts[:1] if name.endswith("fwd") else parts))
    if name.startswith("target patch"):
        return all(p in ok["patch"] for p in variant.split(" (")[0].split("/"))
    # Sub-chunk passes and reversed rows are checked by the cross_entropy tests alone.
    if ("passes of" in variant or "rows reversed" in variant) and "passes" not in ok["ce"]:
        return False
    return not (("chosen GEMMs" in variant or "MAPET_GEMM_TUNE" in variant) and "gemms" not in ok["ce"])

# (name, target in ms, pattern whose groups are the variant and the time)
targets = [
    ("target attention vit-b fwd", 0.20, r"RESULT attention vit-b (\S+(?: \(dependent launches\))?) forward: median ([0-9.]+) ms"),
    ("target attention vit-b fwd+bwd", 0.60,
     r"RESULT attention vit-b (\S+(?: \(dependent launches\))?) forward\+backward: median ([0-9.]+) ms"),
    ("target cross_entropy fwd+bwd", 1.25, r"RESULT cross_entropy forward\+backward\s+([0-9.]+) ms(.*)"),
    ("target patch_embed fwd+bwd", 0.30,
     r"RESULT patch_embed forward\+backward u8 (\S+(?: \(dependent launches\))?) .*: ([0-9.]+) ms median"),
]
for name, goal, pat in targets:
    got = []
    for l in lines:
        m = re.match(pat, l)
        if m:
            a, b = m.groups()
            if name.startswith("target cross"):  # the variant is the line's tail, less its asides
                tail = re.sub(r"\([^)]*\)|median|, extra device memory.*", "", b).strip(" ,")
                ms, variant = float(a), tail or "default"
            else:
                ms, variant = float(b), a
            got.append((ms, variant))
    passed = [g for g in got if tested(name, g[1])]
    if not got:
        print(f"{name}|none|no RESULT line")
        continue
    aside = ""
    if not passed or min(got) < min(passed):
        aside = "; faster, but its tests did not pass in this run: %s %.4f ms" % (min(got)[1], min(got)[0])
    if not passed:
        print(f"{name}|none|no line of a variant whose tests passed, of {len(got)} lines{aside}")
        continue
    ms, variant = min(passed)
    print(f"{name}|{'met' if ms <= goal else 'missed'}|best {ms:.4f} ms (target {goal}) by {variant}, of {len(got)} lines{aside}")
PY
  )
fi

# MAPET_WINNERS=1: the fastest variants whose tests passed in this run, as run-time switches
# (winners.env), then the model's GPU tests with them and `mapet bench` with and without them.
if [ "${MAPET_WINNERS:-0}" = "1" ] && ls "$res"/bench-*.log >/dev/null 2>&1; then
  python3 - "$res" >"$res/winners.txt" 2>&1 <<'PY'
import glob, os, re, sys, time
lines = [l.strip() for f in sorted(glob.glob(sys.argv[1] + "/bench-*.log")) for l in open(f, errors="replace")
         if l.startswith("RESULT ")]
env, notes = [], []

def pick(what, default, got):
    """The fastest of got {label: ms}; the default unless another is more than 1% faster."""
    if not got:
        notes.append(f"{what}: no usable RESULT line, default kept")
        return default
    best = min(got, key=got.get)
    base = got.get(default)
    if best != default and (base is None or got[best] < 0.99 * base):
        notes.append(f"{what}: {best} {got[best]:.4f} ms against the default {default} "
                     f"{'%.4f ms' % base if base is not None else '(no line)'}")
        return best
    notes.append(f"{what}: default {default} kept ({got.get(default, float('nan')):.4f} ms, best {best})")
    return default

def sets(what, default, var, pattern, kernels, backward, nondeterministic=()):
    """The fastest set (or fwd/bwd pair) of `pattern`'s lines whose parts all passed their tests
    (var), as the forward's and the backward's switches. A line with a part in nondeterministic
    (a set whose results change from run to run) is noted, never chosen: a default must give the
    same bits on every run."""
    ok, got = os.environ[var].split(), {}
    for l in lines:
        m = re.match(pattern, l)
        # A "(dependent launches)" line times a variant's kernels launched otherwise (noted below).
        if m and "(dependent launches)" not in l and any(p in nondeterministic for p in m.group(1).split("/")):
            notes.append(f"{what}: {m.group(1)} {float(m.group(2)):.4f} ms (not deterministic: noted, not chosen)")
        elif m and "(dependent launches)" not in l and all(p in ok for p in m.group(1).split("/")):
            got[m.group(1)] = float(m.group(2))
    w = pick(what, default, got)
    fwd, bwd = (w.split("/") + [w])[:2]
    env.extend([f"{kernels}={fwd}", f"{backward}={bwd}"])

sets("attention", "wgmma", "OK_ATTENTION", r"RESULT attention vit-b (\S+) forward\+backward: median ([0-9.]+) ms",
     "MAPET_ATTENTION_KERNELS", "MAPET_ATTENTION_BACKWARD_KERNELS", nondeterministic=("wgmma-fused",))
sets("patch embedding", "hwc-ws-raw", "OK_PATCH", r"RESULT patch_embed forward\+backward u8 (\S+) .*: ([0-9.]+) ms median",
     "MAPET_PATCH_EMBED_ORDER", "MAPET_PATCH_EMBED_BACKWARD_ORDER")
# Programmatic dependent launches (MAPET_DEPENDENT_LAUNCH=1) against the same kernels launched
# plainly, and the wgmma attention kernels sending the next wave's rows to L2 (MAPET_L2_AHEAD=1)
# against the same kernels without, forward alone and with the backward: noted, not chosen (each
# switch covers more than one op or set). The fused set's forward is the wgmma one: its forward
# line is a second reading of the same twin.
for what, how, pat in [
    ("attention", "dependent launches", r"RESULT attention vit-b wgmma(?P<dep> \(dependent launches\))? forward\+backward: median (?P<ms>[0-9.]+) ms"),
    ("patch embedding", "dependent launches", r"RESULT patch_embed forward\+backward u8 hwc-ws-raw(?P<dep> \(dependent launches\))? \(.*: (?P<ms>[0-9.]+) ms median"),
    ("cross-entropy", "dependent launches", r"RESULT cross_entropy forward\+backward (?P<ms>[0-9.]+) ms \(rounds [^)]*\) with one pass,(?P<dep> dependent launches,)? default GEMMs, queued a chunk"),
    ("attention wgmma forward", "next wave to L2", r"RESULT attention vit-b wgmma(?P<dep> \(next wave to L2\))? forward: median (?P<ms>[0-9.]+) ms"),
    ("attention wgmma-fused forward", "next wave to L2", r"RESULT attention vit-b wgmma-fused(?P<dep> \(next wave to L2\))? forward: median (?P<ms>[0-9.]+) ms"),
    ("attention wgmma", "next wave to L2", r"RESULT attention vit-b wgmma(?P<dep> \(next wave to L2\))? forward\+backward: median (?P<ms>[0-9.]+) ms"),
    ("attention wgmma-fused", "next wave to L2", r"RESULT attention vit-b wgmma-fused(?P<dep> \(next wave to L2\))? forward\+backward: median (?P<ms>[0-9.]+) ms"),
]:
    t = {}
    for l in lines:
        m = re.match(pat, l)
        if m:
            t[bool(m.group("dep"))] = float(m.group("ms"))
    if len(t) == 2:
        notes.append(f"{what}: {how} {t[True]:.4f} ms against {t[False]:.4f} ({t[True] / t[False]:.3f})")

# The cross-entropy's queued race: "<passes>[, rows reversed][, paired rows], <GEMMs>, queued",
# timed alike. Paired rows are a variant of the row kernel that its tests cover ("passes").
ok = os.environ["OK_CE"].split()
got, pin, paired_pin = {}, "", ""
for l in lines:
    m = re.match(r"RESULT cross_entropy forward\+backward ([0-9.]+) ms \(rounds [^)]*\) with (.*), (default|chosen|MAPET_GEMM_TUNE) GEMMs, queued a chunk", l)
    # Dependent launches are noted below, not chosen; a line with its own chunk size ("N-row
    # chunks") measures a kernel apart from the chunking its switch brings, and is no switch.
    if m and "dependent launches" not in m.group(2) and "-row chunks" not in m.group(2):
        passes = re.match(r"\d+ passes of <= (\d+) rows", m.group(2))
        rows, gemms = (passes.group(1) if passes else ""), m.group(3)
        order = "reverse" if "rows reversed" in m.group(2) else "forward"
        blocks = "paired" if "paired rows" in m.group(2) else "single"
        if ((rows or order == "reverse" or blocks == "paired") and "passes" not in ok) or (gemms != "default" and "gemms" not in ok):
            continue
        got[f"{rows or 'one pass'}|{order}|{blocks}|{gemms}"] = float(m.group(1))
    m = re.match(r'RESULT cross_entropy chosen GEMMs: MAPET_GEMM_PIN="(.*)"', l)
    if m:
        pin = m.group(1)
    m = re.match(r'RESULT cross_entropy chosen GEMMs with paired rows: MAPET_GEMM_PIN="(.*)"', l)
    if m:
        paired_pin = m.group(1)
c = pick("cross-entropy", "one pass|forward|single|default", got)
rows, order, blocks, gemms = c.split("|")
if rows != "one pass":
    env.append(f"MAPET_CE_SUB_CHUNK_ROWS={rows}")
if order == "reverse":
    env.append("MAPET_CE_ROW_ORDER=reverse")
if blocks == "paired":
    env.append("MAPET_CE_ROW_BLOCKS=paired")
# (paired rows' chunks have GEMMs of other sizes, chosen for them in the bench)
if gemms == "chosen" and (paired_pin if blocks == "paired" else pin):
    env.append(f"MAPET_GEMM_PIN={paired_pin if blocks == 'paired' else pin}")
if gemms == "MAPET_GEMM_TUNE":
    env.append("MAPET_GEMM_TUNE=1")
# Where chosen GEMMs win, the same pins by configuration as an entry of the default pin table
# (src/cuda/gemm.rs, DEFAULT_PINS), for the device and cuBLASLt the bench names.
by_config, device, cublaslt = {}, None, "?"
for l in lines:
    m = re.match(r'RESULT cross_entropy chosen GEMMs( with paired rows)? by configuration: MAPET_GEMM_PIN="(.*)"', l)
    if m:
        by_config["paired" if m.group(1) else "single"] = m.group(2)
    m = re.match(r"RESULT cross_entropy default pin table on (.*) \(compute capability (\d+)\.(\d+), (\d+) SMs\)", l)
    if m:
        device = m.groups()
    m = re.match(r"RESULT cross_entropy GEMM pins chosen with cuBLASLt (\d+) on", l)
    if m:
        cublaslt = m.group(1)
if gemms == "chosen" and by_config.get(blocks) and device:
    card, major, minor, sms = device
    notes.append(
        f'cross-entropy: default pin table entry: DefaultPins {{ compute_capability: ({major}, {minor}), sm_count: {sms}, '
        f'source: "{card}, cuBLASLt {cublaslt}, {time.strftime("%Y-%m-%d")}, cross_entropy bench'
        f'{", paired rows (MAPET_CE_ROW_BLOCKS=paired)" if blocks == "paired" else ""}", pins: "{by_config[blocks]}" }}'
    )
for n in notes:
    print("#", n)
for e in env:
    print(e)
PY
  while IFS= read -r line; do row "winners" "" "${line#\# }"; done < <(grep '^#' "$res/winners.txt")
  grep -v '^#' "$res/winners.txt" | grep '=' >"$res/winners.env"
  row "winners switches" "" "$(tr '\n' ' ' <"$res/winners.env")"
  # The model's GPU tests with the winners (a default that changes must pass them first), then
  # one ViT-B training-step bench without and one with them.
  for t in ${MAPET_WINNERS_TESTS:-model_gpu model_cuda_train}; do
    [ -x "$here/tests/$t" ] || { row "winners test $t" skip "no such test binary"; continue; }
    log="$res/winners-test-$t.log"
    (set -a && . "$res/winners.env" && timeout "${MAPET_TEST_TIMEOUT:-300}" "$here/tests/$t" --test-threads=1) >"$log" 2>&1
    rc=$?
    counts=$(test_counts "$log")
    if [ $rc -eq 0 ]; then row "winners test $t" ok "$counts"; else row "winners test $t" FAIL "rc=$rc $counts (see $log)"; fi
  done
  if [ -x "$here/bin/mapet" ]; then
    for which in defaults winners; do
      log="$res/winners-mapet-bench-$which.log"
      (
        unset MAPET_ATTENTION_KERNELS MAPET_ATTENTION_BACKWARD_KERNELS MAPET_PATCH_EMBED_ORDER \
          MAPET_PATCH_EMBED_BACKWARD_ORDER MAPET_CE_SUB_CHUNK_ROWS MAPET_CE_ROW_ORDER MAPET_CE_ROW_BLOCKS MAPET_GEMM_PIN MAPET_GEMM_TUNE
        [ "$which" = winners ] && set -a && . "$res/winners.env" && set +a
        vit_b_bench
      ) >"$log" 2>&1
      rc=$?
      if [ $rc -eq 0 ]; then row "winners mapet bench $which" ok "$(grep -m1 -i 'images/s' "$log")"; else row "winners mapet bench $which" FAIL "rc=$rc (see $log)"; fi
    done
  fi
fi

echo
echo "== bench lines"
grep -hE 'time:|thrpt:|TFLOP|GB/s' "$res"/bench-*.log 2>/dev/null | head -n 80
echo
echo "== summary ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null))"
printf '%s\n' "${summary[@]}"
if [ -n "${MAPET_RESULTS_TAR:-}" ]; then
  tar czf "$MAPET_RESULTS_TAR" -C "$(dirname "$res")" "$(basename "$res")" && echo "results packed into $MAPET_RESULTS_TAR"
fi
