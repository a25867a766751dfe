#!/usr/bin/env bash
# Renders launch/k8s/jobset.yaml for N hosts and applies it (or, with --dry-run, prints it and the
# kubectl command): a JobSet with one indexed Job of N pods, one adjax process per pod (one host:
# all its GPUs or TPU chips); the coordinator is pod 0's stable DNS name and every process's id
# is its pod's completion index.
#
# Usage:
#   launch/k8s/render.sh --hosts=4 --image=REGISTRY/adjax:TAG [--name=adjax] [--gpus-per-host=8]
#       [--tpu-accelerator=tpu-v5-lite-podslice --tpu-topology=4x4 --chips-per-host=4]
#       [--pvc=adjax-shared] [--dry-run] -- --config=configs/simplenet.py:mvtec_ad \
#       --config.data.root=/shared/mvtec_ad --workdir=/shared/runs/x
#
# The workdir must be on the shared volume (--pvc, mounted at /shared in every pod). Needs the
# JobSet controller (https://github.com/kubernetes-sigs/jobset) in the cluster.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
hosts=2 image="" name="adjax" gpus=8 tpu="" topology="" chips=4 pvc="adjax-shared" dry_run=0 args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --hosts=*) hosts="${1#*=}" ;;
    --image=*) image="${1#*=}" ;;
    --name=*) name="${1#*=}" ;;
    --gpus-per-host=*) gpus="${1#*=}" ;;
    --tpu-accelerator=*) tpu="${1#*=}" ;;
    --tpu-topology=*) topology="${1#*=}" ;;
    --chips-per-host=*) chips="${1#*=}" ;;
    --pvc=*) pvc="${1#*=}" ;;
    --dry-run) dry_run=1 ;;
    --) shift; args=("$@"); break ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "render.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ -n "$image" ]] || { echo "render.sh: --image is required (see --help)" >&2; exit 2; }
[[ ${#args[@]} -gt 0 ]] || { echo "render.sh: give the adjax.main flags after -- (see --help)" >&2; exit 2; }

if [[ -n "$tpu" ]]; then  # a multi-host TPU slice: one pod per TPU VM host, all its chips
  [[ -n "$topology" ]] || { echo "render.sh: --tpu-accelerator needs --tpu-topology (e.g. 4x4)" >&2; exit 2; }
  accelerator="google.com/tpu: $chips"
  selector="cloud.google.com/gke-tpu-accelerator: $tpu\n                cloud.google.com/gke-tpu-topology: $topology"
  devices="$chips TPU chips ($tpu $topology)"
else
  accelerator="nvidia.com/gpu: $gpus"
  selector="kubernetes.io/os: linux"
  devices="$gpus GPUs"
fi
flags=""
for arg in "${args[@]}"; do flags+="                    - \"${arg//\"/\\\"}\""$'\n'; done
manifest="$(sed -e "s|@NAME@|$name|g" -e "s|@HOSTS@|$hosts|g" -e "s|@IMAGE@|$image|g" -e "s|@PVC@|$pvc|g" \
  -e "s|@ACCELERATOR@|$accelerator|g" -e "s|@SELECTOR@|$selector|g" "$here/jobset.yaml")"
manifest="$(printf '%b' "$manifest")"  # the selector's line break
manifest="${manifest/@ARGS@/${flags%$'\n'}}"

echo "# $hosts hosts x $devices: $hosts processes (one per pod); coordinator $name-workers-0-0.$name:1234"
if [[ $dry_run -eq 1 ]]; then
  echo "$manifest"
  echo "+ kubectl apply -f -"
else
  echo "$manifest" | kubectl apply -f -
fi
