#!/usr/bin/env bash
# Launches one training process of a multi-host run on JAX's distributed runtime.
# Run it on every host with the same arguments except PROCESS_ID:
#
#   COORDINATOR=host0:1234 NUM_PROCESSES=4 PROCESS_ID=<0..3> \
#     launch/multihost.sh --config=configs/synthetic.py --workdir=/shared/runs/x
#
# Each process reads only its own slice of every global batch (mian_jax/data/pipeline.py);
# only process 0 writes metrics and evaluation files; orbax coordinates the checkpoint writes,
# so --workdir must be on a file system all hosts see. Under SLURM or on Cloud TPU, leave
# COORDINATOR unset: jax.distributed.initialize() then finds its peers itself
# (launch/slurm.sbatch). To start N processes on one machine, use launch/local.py.
# Process 0 serves the coordinator: a port already taken on its host is a one-line error
# before anything starts (JAX would crash on it, and leave the other processes waiting).
set -euo pipefail
export MIAN_JAX_DISTRIBUTED=1
if [[ -n "${COORDINATOR:-}" ]]; then
  export MIAN_JAX_COORDINATOR="$COORDINATOR"
  export MIAN_JAX_NUM_PROCESSES="${NUM_PROCESSES:?set NUM_PROCESSES}"
  export MIAN_JAX_PROCESS_ID="${PROCESS_ID:?set PROCESS_ID}"
  if [[ "$PROCESS_ID" == 0 ]]; then
    python - "$COORDINATOR" <<'PROBE'
import errno, socket, sys
address = sys.argv[1]
port = address.rpartition(":")[2]
if not port.isdigit():
  sys.exit(f"error: COORDINATOR={address}: expected host:port")
with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
  s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a server binds
  try:
    s.bind(("", int(port)))
  except OSError as e:
    if e.errno != errno.EADDRINUSE:
      raise
    sys.exit(f"error: the coordinator port {port} (COORDINATOR={address}) is already in use "
             "on this host; choose another port")
PROBE
  fi
fi
exec python -m mian_jax.main "$@"
