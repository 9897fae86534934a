#!/usr/bin/env bash
# Starts N `jaxllm train` processes on this machine as one multi-controller JAX run.
#
# Each process is one "host" of a CPU cluster: it sees K fake CPU devices
# (XLA_FLAGS=--xla_force_host_platform_device_count=K), the processes meet at a
# coordinator on 127.0.0.1 and exchange collectives over gloo. This is how the
# multi-host code paths (per-host data slices, orbax saves from every process,
# process-0-only logs) are exercised without a cluster.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: launch/local_multiprocess.sh [options] N CONFIG [key=value ...] --workdir DIR

Runs N `jaxllm train CONFIG [key=value ...] --workdir DIR` processes on localhost
with JAX's multi-controller runtime over CPU collectives (gloo). Every output line
is prefixed with its process rank; if any process fails the others are stopped and
the launcher exits with that process's status.

options:
  --devices-per-process K  fake CPU devices per process (default 1)
  --port P                 coordinator port (default: a free port)
  --jaxllm CMD             the jaxllm executable (default: `jaxllm` on PATH, else .venv/bin/jaxllm)
  --dry-run                print the commands, one per line, and run nothing
  -h, --help               show this help

example:
  launch/local_multiprocess.sh --devices-per-process 4 2 configs/lm_tiny.yaml \
      train.steps=50 --workdir runs/tiny_2proc
USAGE
}

die() {
  echo "local_multiprocess.sh: error: $*" >&2
  exit 2
}

devices=1
port=""
jaxllm_cmd=""
dry_run=0
workdir=""
positional=()
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1 ;;
    --devices-per-process | --port | --jaxllm | --workdir)
      (($# >= 2)) || die "$1 needs a value"
      case "$1" in
        --devices-per-process) devices="$2" ;;
        --port) port="$2" ;;
        --jaxllm) jaxllm_cmd="$2" ;;
        --workdir) workdir="$2" ;;
      esac
      shift ;;
    --*) die "unknown option '$1'; see --help" ;;
    *) positional+=("$1") ;;
  esac
  shift
done

((${#positional[@]} >= 2)) || die "expected N and CONFIG; see --help"
nproc="${positional[0]}"
config="${positional[1]}"
overrides=("${positional[@]:2}")
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || die "N='$nproc' must be a positive integer (the process count)"
[[ "$devices" =~ ^[1-9][0-9]*$ ]] \
  || die "--devices-per-process '$devices' must be a positive integer"
[[ -z "$port" || "$port" =~ ^[1-9][0-9]*$ ]] || die "--port '$port' must be a port number"
[[ -n "$workdir" ]] || die "--workdir DIR is required"
for o in "${overrides[@]}"; do
  [[ "$o" == *=* ]] || die "'$o' is not a key=value override"
  # The launcher owns these: a second value would make the processes disagree.
  [[ "$o" != distributed.* ]] || die "'$o': the launcher sets distributed.* itself"
done

if [[ -z "$jaxllm_cmd" ]]; then
  if command -v jaxllm >/dev/null 2>&1; then
    jaxllm_cmd=jaxllm
  else
    jaxllm_cmd="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/bin/jaxllm"
  fi
fi
if [[ -z "$port" ]]; then
  if ((dry_run)); then
    port=PORT  # printed as a placeholder: a free port is only picked for a real run
  else
    port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  fi
fi

# Each process gets its own device count; any inherited count would be overridden
# anyway, other XLA flags are kept.
xla_flags="$(printf '%s' "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')"
xla_flags="$(echo "$xla_flags --xla_force_host_platform_device_count=$devices" | xargs)"

# Prints a command as one shell line that runs exactly it: words that need quoting
# are single-quoted (readable, unlike printf %q).
show() {
  local out="" word
  for word in "$@"; do
    if [[ "$word" =~ ^[-A-Za-z0-9_@%+=:,./]+$ ]]; then
      out+="$word "
    else
      out+="'${word//\'/\'\\\'\'}' "
    fi
  done
  echo "${out% }"
}

# Sets `argv` to the command of process $1.
rank_argv() {
  argv=(env JAX_PLATFORMS=cpu "XLA_FLAGS=$xla_flags" "$jaxllm_cmd" train "$config"
    "${overrides[@]}" "distributed.coordinator=127.0.0.1:$port"
    "distributed.num_processes=$nproc" "distributed.process_id=$1" --workdir "$workdir")
}

if ((dry_run)); then
  for ((i = 0; i < nproc; i++)); do
    rank_argv "$i"
    show "${argv[@]}"
  done
  exit 0
fi

pids=()
stop_all() {
  # SIGTERM first (jaxllm's preemption handler may still commit a checkpoint), then
  # SIGKILL: a process blocked in a collective with a dead peer never returns.
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 1 20); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || return 0
    sleep 0.5
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM

prefix() {
  local line
  while IFS= read -r line || [[ -n "$line" ]]; do
    printf '[rank %d] %s\n' "$1" "$line"
  done
}

for ((i = 0; i < nproc; i++)); do
  rank_argv "$i"
  # exec: the background job *is* the process (its pid is the one to wait on and kill).
  (exec "${argv[@]}") > >(prefix "$i") 2>&1 &
  pids+=("$!")
done

status=0
remaining=$nproc
declare -A finished=()
while ((remaining > 0)); do
  for i in "${!pids[@]}"; do
    [[ -z "${finished[$i]:-}" ]] || continue
    kill -0 "${pids[$i]}" 2>/dev/null && continue
    rc=0
    wait "${pids[$i]}" || rc=$?
    finished[$i]=1
    remaining=$((remaining - 1))
    if ((rc != 0 && status == 0)); then
      status=$rc
      echo "local_multiprocess.sh: process $i exited with status $rc; stopping the others" >&2
      stop_all
    fi
  done
  ((remaining > 0)) && sleep 0.5
done
wait  # let the log prefixers drain
exit "$status"
