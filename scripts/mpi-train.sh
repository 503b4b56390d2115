#!/usr/bin/env bash
# Data, tensor and expert parallelism over MPI: the smoke recipe under `mpirun -n 2` and
# `-n 4 --oversubscribe` (plain DP and ZeRO-1, and dp2·tp2·ep2 with sequence parallelism and
# ZeRO-1) against the one-rank run of the same global batch of 8 sequences: losses per step
# gradient norms (relative) and final weights within 1e-5 (tests/interop/compare_runs.py).
# AdamW's eps is 1e-6 here, not the recipe's 1e-8: an update moves a weight by lr·δg/eps for a
# rounding error δg in a gradient near zero, and a sharded layout sums in another order (one
# q_proj gradient of 3e-9, among a median of 8e-4, moved its weight 1.4e-5 apart at eps 1e-8).
# Needs a moeru built with `--features mpi` at target/debug/moeru, Open MPI, and Python with
# numpy + safetensors.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_btl_vader_single_copy_mechanism="${OMPI_MCA_btl_vader_single_copy_mechanism:-none}"
bin=target/debug/moeru
out=$(mktemp -d)
steps=10

run() { # name, grad_accum, launcher...
    local name=$1 accum=$2
    shift 2
    "$@" "$bin" train recipes/smoke-tiny-moe.yaml \
        --set train.steps=$steps --set train.micro_batch_size=2 --set train.grad_accum="$accum" \
        --set data.seq_len=64 --set data.eval=null --set train.eval_every=0 \
        --set checkpoint.every=$steps --set checkpoint.dir="$out/$name/ckpt" \
        --set logging.dir="$out/$name/logs" --set logging.progress=false \
        --set logging.tensorboard=false --set optim.eps=1e-6 ${ZERO:+--set parallel.zero_stage=1} ${EXTRA:-}
}

run one 4 env
run mpi2 2 mpirun -n 2
ZERO=1 run mpi2-zero1 2 mpirun -n 2
run mpi4 1 mpirun -n 4 --oversubscribe
ZERO=1 run mpi4-zero1 1 mpirun -n 4 --oversubscribe
ZERO=1 EXTRA="--set parallel.tp=2 --set parallel.ep=2 --set parallel.sequence_parallel=true" \
    run mpi4-tp2-ep2 2 mpirun -n 4 --oversubscribe
for r in mpi2 mpi2-zero1 mpi4 mpi4-zero1 mpi4-tp2-ep2; do
    python3 tests/interop/compare_runs.py "$out/one" "$out/$r" $steps
done
rm -rf "$out"
