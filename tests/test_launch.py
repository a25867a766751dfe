"""launch/: every script passes a shell syntax check, and its --dry-run for a 4-host example prints
the commands a cluster would run: the right hosts, process counts and environment (issue 20)."""

import os
import subprocess

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["launch/tpu_vm.sh", "launch/slurm.sbatch", "launch/k8s/render.sh"]
ADJAX = ["--config=configs/simplenet.py:mvtec_ad", "--workdir=/shared/runs/simplenet"]


def dry_run(*args):
  done = subprocess.run(["bash", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                        env={**os.environ, "PATH": "/usr/bin:/bin"})  # no gcloud, srun or kubectl is run
  assert done.returncode == 0, done.stderr
  return done.stdout


def test_scripts_pass_a_syntax_check_and_have_a_usage_header():
  for script in SCRIPTS:
    subprocess.run(["bash", "-n", script], cwd=ROOT, check=True)
    assert "Usage" in open(os.path.join(ROOT, script)).read(800), script


def test_tpu_vm_dry_run():
  out = dry_run("launch/tpu_vm.sh", "--name=adjax-v4", "--zone=us-central2-b", "--accelerator=v4-32",
                "--bucket=runs-bucket", "--workdir=runs/simplenet", "--copy-back=runs/", "--delete", "--dry-run", "--",
                *ADJAX[:1], "--config.data.root=/mnt/runs-bucket/mvtec_ad")
  lines = [line for line in out.splitlines() if line.startswith("+ ")]
  assert lines[0].startswith("+ gcloud compute tpus tpu-vm create adjax-v4 --zone=us-central2-b "
                             "--accelerator-type=v4-32")
  install, train = lines[1], lines[2]
  assert "--worker=all" in install and "pip install" in install and "jax[tpu]" in install
  assert "gcsfuse --implicit-dirs runs-bucket /mnt/runs-bucket" in install
  assert "--worker=all" in train and "ADJAX_DISTRIBUTED=1 python3 -m adjax.main" in train
  assert "--workdir=/mnt/runs-bucket/runs/simplenet" in train and "--config=configs/simplenet.py:mvtec_ad" in train
  assert lines[3].startswith("+ gcloud compute tpus tpu-vm scp --recurse adjax-v4:/mnt/runs-bucket/runs/simplenet")
  assert "--worker=0" in lines[3] and lines[4].startswith("+ gcloud compute tpus tpu-vm delete adjax-v4")


def test_slurm_dry_run_is_one_process_per_gpu():
  out = dry_run("launch/slurm.sbatch", "--dry-run", "--nodes=4", "--gpus-per-node=8", "--", *ADJAX)
  assert "4 nodes x 8 GPUs: 32 processes" in out
  command = next(line for line in out.splitlines() if line.startswith("+ "))
  assert command.startswith("+ srun --nodes=4 --ntasks-per-node=8 --gpus-per-task=1")
  assert command.endswith("python -m adjax.main " + " ".join(ADJAX))
  header = open(os.path.join(ROOT, "launch/slurm.sbatch")).read()
  assert "#SBATCH --ntasks-per-node=8" in header and "#SBATCH --gpus-per-node=8" in header


def test_k8s_dry_run_renders_a_jobset_with_the_coordinator_and_process_ids():
  out = dry_run("launch/k8s/render.sh", "--hosts=4", "--image=registry/adjax:1", "--dry-run", "--", *ADJAX)
  assert "4 hosts x 8 GPUs: 4 processes" in out and out.rstrip().endswith("+ kubectl apply -f -")
  manifest = yaml.safe_load(out.split("\n", 1)[1].rsplit("+ kubectl", 1)[0])
  job = manifest["spec"]["replicatedJobs"][0]["template"]["spec"]
  assert job["parallelism"] == job["completions"] == 4 and job["completionMode"] == "Indexed"
  pod = job["template"]["spec"]
  container = pod["containers"][0]
  assert container["image"] == "registry/adjax:1" and container["args"] == ADJAX
  env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
  assert env["JAX_COORDINATOR_ADDRESS"] == "adjax-workers-0-0.adjax:1234" and env["JAX_NUM_PROCESSES"] == "4"
  assert env["JAX_PROCESS_ID"]["fieldRef"]["fieldPath"].endswith("job-completion-index']")
  assert container["resources"]["limits"] == {"nvidia.com/gpu": 8}
  tpu = dry_run("launch/k8s/render.sh", "--hosts=4", "--image=registry/adjax:1",
                "--tpu-accelerator=tpu-v5-lite-podslice", "--tpu-topology=4x4", "--chips-per-host=4", "--dry-run", "--",
                *ADJAX)
  pod = yaml.safe_load(tpu.split("\n", 1)[1].rsplit("+ kubectl", 1)[0])["spec"]["replicatedJobs"][0]
  pod = pod["template"]["spec"]["template"]["spec"]
  assert pod["containers"][0]["resources"]["limits"] == {"google.com/tpu": 4}
  assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
                                 "cloud.google.com/gke-tpu-topology": "4x4"}
