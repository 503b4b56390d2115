#!/usr/bin/env bash
# A long fault-injection campaign (docs/RELIABILITY.md): TRIALS two-process jobs, each with one
# rank killed or hung at a step and point drawn from SEED, every one resuming by itself to a
# final model byte-identical to the uninterrupted run. Prints the table and keeps it in
# runs/fault-campaign-seed<SEED>.txt.
#   scripts/fault-campaign.sh [TRIALS=20] [SEED=1]
set -euo pipefail
cd "$(dirname "$0")/.."
trials=${1:-20}
seed=${2:-1}
mkdir -p runs
MOERU_CAMPAIGN_TRIALS=$trials MOERU_CAMPAIGN_SEED=$seed \
  cargo test --locked -p moeru --test fault_campaign -- --nocapture 2>&1 \
  | grep -E "^(fault campaign|trial|test result)" | tee "runs/fault-campaign-seed$seed.txt"
