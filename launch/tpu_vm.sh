#!/usr/bin/env bash
# Trains on a Cloud TPU VM (one host or a multi-host slice): create, copy, install, run, delete.
#
# Every worker of the slice gets the same code and runs the same `jaxllm train`
# command (`--worker=all`) with distributed.num_processes=-1: JAX finds the other
# workers from the TPU metadata (Orbax needs that distributed client to save). The TPU is deleted at the end, also when a step
# fails or the script is interrupted (unless --keep).
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: launch/tpu_vm.sh --name NAME --zone ZONE --accelerator-type TYPE [options]
                        CONFIG [key=value ...] --workdir DIR

Creates a Cloud TPU VM (or a queued resource), copies this checkout to every
worker, installs it (pip install './jaxllm[tpu]'), runs
`jaxllm train CONFIG [key=value ...] distributed.num_processes=-1 --workdir DIR` on
all workers (-1: JAX takes the workers from the TPU) with their logs streamed here,
and deletes the TPU at the end (also on failure or Ctrl-C).

required:
  --name NAME              TPU (and queued resource) name
  --zone ZONE              e.g. us-central2-b
  --accelerator-type TYPE  e.g. v4-8, v5litepod-16, v6e-8
  --workdir DIR            run directory on the workers. jaxllm writes through the
                           filesystem: on a multi-host slice DIR must be storage every
                           worker shares (NFS/Filestore or a gcsfuse mount); gs:// URLs
                           are not supported
options:
  --version VERSION        TPU software version (default by type: v5litepod-*
                           v2-alpha-tpuv5-lite, v5p-* v2-alpha-tpuv5, v6e-*
                           v2-alpha-tpuv6e, others tpu-ubuntu2204-base)
  --project PROJECT        gcloud project (default: gcloud's configured one)
  --queued                 request a queued resource and wait until it is ACTIVE
  --spot                   spot (preemptible) capacity; jaxllm saves a checkpoint on SIGTERM
  --python PYTHON          Python on the workers (default python3; it must be one
                           the installed jax release supports)
  --keep                   do not delete the TPU at the end
  --dry-run                print the commands, one per line, and run nothing
  -h, --help               show this help

example:
  launch/tpu_vm.sh --name jaxllm-v4 --zone us-central2-b --accelerator-type v4-8 \
      configs/gpt2_124m.yaml train.steps=1000 --workdir runs/gpt2
USAGE
}

die() {
  echo "tpu_vm.sh: error: $*" >&2
  exit 2
}

name="" zone="" accel="" version="" project="" workdir=""
python=python3
queued=0 spot=0 keep=0 dry_run=0
positional=()
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1 ;;
    --queued) queued=1 ;;
    --spot) spot=1 ;;
    --keep) keep=1 ;;
    --name | --zone | --accelerator-type | --version | --project | --workdir | --python)
      (($# >= 2)) || die "$1 needs a value"
      case "$1" in
        --name) name="$2" ;;
        --zone) zone="$2" ;;
        --accelerator-type) accel="$2" ;;
        --version) version="$2" ;;
        --project) project="$2" ;;
        --workdir) workdir="$2" ;;
        --python) python="$2" ;;
      esac
      shift ;;
    --*) die "unknown option '$1'; see --help" ;;
    *) positional+=("$1") ;;
  esac
  shift
done

[[ -n "$name" ]] || die "--name NAME is required"
[[ "$name" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
  || die "--name '$name' must be lower-case letters, digits and '-' (a GCP resource name)"
[[ -n "$zone" ]] || die "--zone ZONE is required (e.g. us-central2-b)"
[[ -n "$accel" ]] || die "--accelerator-type TYPE is required (e.g. v4-8)"
[[ -n "$workdir" ]] || die "--workdir DIR is required"
[[ "$workdir" != gs://* ]] \
  || die "--workdir '$workdir': gs:// is not supported; use a path on a gcsfuse mount or NFS"
((${#positional[@]} >= 1)) || die "expected CONFIG; see --help"
config="${positional[0]}"
overrides=("${positional[@]:1}")
for o in "${overrides[@]}"; do
  [[ "$o" == *=* ]] || die "'$o' is not a key=value override"
  [[ "$o" != distributed.* ]] || die "'$o': the workers take distributed.* from the TPU"
done

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[[ -f "$repo/$config" || -f "$config" ]] || die "config '$config' not found"
if [[ -f "$repo/$config" ]]; then
  remote_config="$config"  # inside the copied checkout
else
  # A config outside the checkout travels with the code; it is named by its path
  # relative to the checkout root when it lies inside it.
  abs="$(cd "$(dirname "$config")" && pwd)/$(basename "$config")"
  [[ "$abs" == "$repo"/* ]] || die "config '$config' must lie inside $repo to be copied"
  remote_config="${abs#"$repo"/}"
fi

if [[ -z "$version" ]]; then
  case "$accel" in
    v5litepod-* | v5e-*) version=v2-alpha-tpuv5-lite ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v6e-*) version=v2-alpha-tpuv6e ;;
    *) version=tpu-ubuntu2204-base ;;
  esac
fi
where=(--zone="$zone")
[[ -z "$project" ]] || where+=(--project="$project")
tarball="/tmp/jaxllm-$name.tar.gz"

if ((queued)); then
  create=(gcloud compute tpus queued-resources create "$name" --node-id="$name"
    "${where[@]}" --accelerator-type="$accel" --runtime-version="$version")
  ((spot)) && create+=(--spot)
  # Polled every 30 s until the state is ACTIVE (FAILED/SUSPENDED stop the script).
  state=(gcloud compute tpus queued-resources describe "$name" "${where[@]}"
    "--format=value(state.state)")
  delete=(gcloud compute tpus queued-resources delete "$name" "${where[@]}" --force --quiet)
else
  create=(gcloud compute tpus tpu-vm create "$name" "${where[@]}"
    --accelerator-type="$accel" --version="$version")
  ((spot)) && create+=(--spot)
  state=()
  delete=(gcloud compute tpus tpu-vm delete "$name" "${where[@]}" --quiet)
fi
# The checkout as it is (uncommitted edits included), without environments and caches.
pack=(tar -czf "$tarball" -C "$repo")
for x in .git .venv .cache runs .hypothesis .pytest_cache .ruff_cache; do
  pack+=(--exclude="./$x")
done
pack+=(--exclude=__pycache__ --exclude='*.egg-info' .)
scp=(gcloud compute tpus tpu-vm scp "$tarball" "$name:jaxllm.tar.gz" --worker=all "${where[@]}")
install_cmd="rm -rf jaxllm && mkdir jaxllm && tar -xzf jaxllm.tar.gz -C jaxllm"
install_cmd+=" && $python -m pip install -q './jaxllm[tpu]'"
install=(gcloud compute tpus tpu-vm ssh "$name" --worker=all "${where[@]}"
  --command "$install_cmd")
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

train_args=("$python" -m jaxllm.cli train "$remote_config" "${overrides[@]}"
  distributed.num_processes=-1 --workdir "$workdir")
run=(gcloud compute tpus tpu-vm ssh "$name" --worker=all "${where[@]}"
  --command "cd jaxllm && $(show "${train_args[@]}")")


if ((dry_run)); then
  show "${create[@]}"
  ((${#state[@]})) && show "${state[@]}"
  show "${pack[@]}"
  show "${scp[@]}"
  show "${install[@]}"
  show "${run[@]}"
  ((keep)) || show "${delete[@]}"
  exit 0
fi

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  rm -f "$tarball"
  if ((keep)); then
    echo "tpu_vm.sh: kept TPU '$name' (--keep); delete it with: $(show "${delete[@]}")" >&2
  else
    echo "tpu_vm.sh: deleting TPU '$name'" >&2
    "${delete[@]}" || echo "tpu_vm.sh: delete failed; run: $(show "${delete[@]}")" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"${create[@]}"
if ((${#state[@]})); then
  while true; do
    s="$("${state[@]}")"
    echo "tpu_vm.sh: queued resource '$name' is ${s:-unknown}" >&2
    case "$s" in
      ACTIVE) break ;;
      FAILED | SUSPENDED) die "queued resource '$name' is $s" ;;
    esac
    sleep 30
  done
fi
"${pack[@]}"
"${scp[@]}"
"${install[@]}"
"${run[@]}"
