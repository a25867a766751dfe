#!/usr/bin/env bash
# Train with adjax on a Cloud TPU VM slice: create (or reuse) the slice, install adjax on every
# worker, start the same `python -m adjax.main ...` on all workers, copy the workdir back, and
# delete the slice on request.
#
# Usage:
#   launch/tpu_vm.sh --name=NAME --zone=ZONE [--accelerator=v4-32] [--version=tpu-ubuntu2204-base]
#       [--project=PROJECT] [--repo=GIT_URL] [--ref=main] [--bucket=BUCKET] [--workdir=runs/x]
#       [--copy-back=LOCAL_DIR] [--delete] [--dry-run]
#       -- --config=configs/simplenet.py:mvtec_ad --config.data.root=/mnt/BUCKET/mvtec_ad [...adjax.main flags]
#
# Every worker runs the same command with ADJAX_DISTRIBUTED=1: on TPU, jax.distributed.initialize()
# finds the process count and ids by itself. All processes write checkpoints, so the workdir must
# be on a filesystem every worker sees: --bucket=B mounts gs://B at /mnt/B on all workers
# (gcsfuse) and a relative --workdir is placed there. --copy-back copies it from worker 0.
# --dry-run prints every command instead of running it.
set -euo pipefail

name="" zone="" accelerator="v4-32" version="tpu-ubuntu2204-base" project="" repo="" ref="main"
bucket="" workdir="runs/tpu" copy_back="" delete=0 dry_run=0
adjax_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --accelerator=*) accelerator="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --repo=*) repo="${1#*=}" ;;
    --ref=*) ref="${1#*=}" ;;
    --bucket=*) bucket="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --copy-back=*) copy_back="${1#*=}" ;;
    --delete) delete=1 ;;
    --dry-run) dry_run=1 ;;
    --) shift; adjax_args=("$@"); break ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "tpu_vm.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ -n "$name" && -n "$zone" ]] || { echo "tpu_vm.sh: --name and --zone are required (see --help)" >&2; exit 2; }
[[ ${#adjax_args[@]} -gt 0 ]] || { echo "tpu_vm.sh: give the adjax.main flags after -- (see --help)" >&2; exit 2; }
repo="${repo:-$(git -C "$(dirname "$0")/.." remote get-url origin 2>/dev/null || echo https://github.com/adjax/adjax.git)}"
if [[ -n "$bucket" && "$workdir" != /* ]]; then workdir="/mnt/$bucket/$workdir"; fi

quote() {  # shell words as a person would type them
  local out="" word
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./=:@,+%-]+$ ]]; then out+=" $word"; else out+=" '${word//\'/\'\\\'\'}'"; fi
  done
  printf '%s' "${out# }"
}

run() {  # prints the command; runs it unless --dry-run
  echo "+ $(quote "$@")"
  if [[ $dry_run -eq 0 ]]; then "$@"; fi
}

tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$zone")
[[ -n "$project" ]] && where+=(--project="$project")

if [[ $dry_run -eq 0 ]] && "${tpu[@]}" describe "$name" "${where[@]}" >/dev/null 2>&1; then
  echo "reusing the TPU VM $name"
else
  run "${tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$accelerator" --version="$version"
fi

install="set -e; rm -rf adjax; git clone --depth 1 --branch $(quote "$ref") $(quote "$repo") adjax; cd adjax;"
install+=" python3 -m pip install -q -e . 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
if [[ -n "$bucket" ]]; then
  install+="; sudo mkdir -p /mnt/$bucket && sudo chown \$USER /mnt/$bucket && gcsfuse --implicit-dirs $bucket /mnt/$bucket"
fi
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$install"

run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all \
  --command="cd adjax && ADJAX_DISTRIBUTED=1 $(quote python3 -m adjax.main --workdir="$workdir" "${adjax_args[@]}")"

if [[ -n "$copy_back" ]]; then
  src="$workdir"; [[ "$src" == /* ]] || src="adjax/$src"
  run "${tpu[@]}" scp --recurse "$name:$src" "$copy_back" "${where[@]}" --worker=0
fi
if [[ $delete -eq 1 ]]; then
  run "${tpu[@]}" delete "$name" "${where[@]}" --quiet
fi
