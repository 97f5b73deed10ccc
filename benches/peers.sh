#!/usr/bin/env bash
# The crate beside JAX and PyTorch on the peers' workloads (../shared/peers/README.md),
# back to back in one run, so that the ratios are taken under the same machine load.
#
# Usage: bash benches/peers.sh [ROUNDS] [WORKLOAD ...]     (default: 1 round of em dsm fpe)
#        bash benches/peers.sh 2 unet-dsm unet-fpe unet-em  (the image U-Net beside torch_unet.py)
# Needs the peers' venv: bash ../shared/peers/setup.sh --torch   (PEERS_VENV overrides it)
#
# Prints one row per program: workload, round, program, the workload's `value unit`, and
# the peak resident set (`/usr/bin/time -v`'s maximum RSS, in MiB). `crate` is MlpScore's
# hand-written training pass; `graph` the same training through candle's autodiff, as a
# network of your own would train.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-1}
shift || true
workloads=("$@")
[ ${#workloads[@]} -gt 0 ] || workloads=(em dsm fpe)
python=${PEERS_VENV:-$HOME/.cache/peers-venv}/bin/python
peers=../shared/peers
[ -x "$python" ] || { echo "no peers venv at $python: run bash $peers/setup.sh --torch" >&2; exit 1; }

cargo build --release --example peer_workloads
crate=target/release/examples/peer_workloads
# What .cargo/config.toml sets for cargo run (the binary is run directly here).
export CANDLE_GRAD_DO_NOT_DETACH=1 CANDLE_NUM_THREADS=1
export GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296

run() { # workload round name command...
  local w=$1 r=$2 name=$3 log
  shift 3
  log=$(mktemp)
  /usr/bin/time -v "$@" >"$log.out" 2>"$log"
  local value rss
  value=$(grep -E "^[a-z0-9_]+ [0-9.]+ " "$log.out" | head -n 1 | cut -d' ' -f2-)
  rss=$(awk -F: '/Maximum resident set size/ {printf "%.1f", $2 / 1024}' "$log")
  printf '%-8s round %s  %-8s %-22s peak %s MiB\n' "$w" "$r" "$name" "$value" "$rss"
  rm -f "$log" "$log.out"
}

echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq 1 "$rounds"); do
  for w in "${workloads[@]}"; do
    if [[ $w == unet-* ]]; then
      # The U-Net (UNET.md): eager PyTorch beside the crate, which trains it through the graph.
      run "$w" "$r" pytorch "$python" "$peers/torch_unet.py" "${w#unet-}"
      run "$w" "$r" crate "$crate" "$w"
      continue
    fi
    run "$w" "$r" jax "$python" "$peers/jax_ref.py" "$w"
    run "$w" "$r" pytorch "$python" "$peers/torch_ref.py" "$w"
    run "$w" "$r" crate "$crate" "$w"
    # Training also through candle's graph: the speed of a network of your own.
    [ "$w" = em ] || run "$w" "$r" graph "$crate" "$w" --graph
  done
done
