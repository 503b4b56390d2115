#!/usr/bin/env bash
# Tests of the MPI backend (moeru-parallel, feature `mpi`) under mpirun: every collective
# with 2 and 4 ranks, then the failure paths: a silent rank (timeout) and an aborting rank
# must each end the job quickly and non-zero.
# Needs Open MPI: apt-get install libopenmpi-dev openmpi-bin libclang-dev
set -euo pipefail
cd "$(dirname "$0")/.."

# CI containers run as root, which mpirun refuses unless told otherwise.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# Containers often forbid the cross-process memory copy (CMA) that shared-memory transfers of
# large messages use; copying through the shared segment works everywhere.
export OMPI_MCA_btl_vader_single_copy_mechanism="${OMPI_MCA_btl_vader_single_copy_mechanism:-none}"

echo "building the MPI test binary"
# The same command as .ci/run's MPI build, so features unify the same way and nothing is
# rebuilt; the test target's artifact line names the executable.
bin=$(cargo build -p moeru -p moeru-parallel --features moeru/mpi --bin moeru --test mpi \
    --message-format=json |
    grep '"reason":"compiler-artifact"' | grep '"kind":\["test"\]' | grep '"name":"mpi"' |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
[ -x "$bin" ] || { echo "no test executable found" >&2; exit 1; }

fail() { echo "FAIL: $*" >&2; exit 1; }

run_ops() {
    local n=$1; shift
    local start out
    start=$(date +%s%N)
    echo "== mpirun -n $n${*:+ $*}: all ops"
    out=$(timeout 300 mpirun -n "$n" "$@" "$bin" 2>&1) || { echo "$out"; fail "$n ranks exited non-zero"; }
    echo "$out"
    grep -q "mpi collectives: ok ($n ranks)" <<<"$out" || fail "no success line for $n ranks"
    echo "-- $n ranks took $((($(date +%s%N) - start) / 1000000)) ms"
}

run_ops 2
run_ops 4 --oversubscribe

# The last rank sleeps for 60 s; the other times out after 1 s and exits non-zero, which
# must make mpirun stop the sleeper: the job ends non-zero within timeout + 5 s.
echo "== mpirun -n 2: timeout"
start=$(date +%s%N)
set +e
out=$(MOERU_MPI_TEST=timeout timeout 120 mpirun -n 2 -x MOERU_MPI_TEST "$bin" 2>&1)
rc=$?
set -e
elapsed_ms=$((($(date +%s%N) - start) / 1000000))
echo "$out"
echo "-- exit code $rc after ${elapsed_ms} ms"
[ "$rc" -ne 0 ] || fail "the timeout job exited 0"
[ "$rc" -ne 124 ] || fail "the timeout job hung (killed by timeout 120)"
grep -q "mpi timeout: ok (rank 0): all_reduce on group \`world\` timed out" <<<"$out" ||
    fail "rank 0 did not report the expected timeout"
[ "$elapsed_ms" -lt 6000 ] || fail "the timeout job took ${elapsed_ms} ms (limit: timeout 1 s + 5 s)"

# One rank aborts while the other waits in a barrier (60 s timeout): MPI_Abort ends the job.
echo "== mpirun -n 2: abort"
start=$(date +%s%N)
set +e
out=$(MOERU_MPI_TEST=abort timeout 120 mpirun -n 2 -x MOERU_MPI_TEST "$bin" 2>&1)
rc=$?
set -e
elapsed_ms=$((($(date +%s%N) - start) / 1000000))
echo "$out"
echo "-- exit code $rc after ${elapsed_ms} ms"
[ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] || fail "the abort job exited $rc"
grep -q "rank 1: aborting the MPI job: test abort" <<<"$out" || fail "rank 1 did not say why"
! grep -q "instead of being aborted" <<<"$out" || fail "the barrier returned"
[ "$elapsed_ms" -lt 10000 ] || fail "the abort job took ${elapsed_ms} ms"

echo "mpi tests: all passed"
