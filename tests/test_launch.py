"""Multi-node paths on one machine: two torchrun "nodes" on localhost, the launch/ scripts' dry runs
(SLURM with a fake 8-node allocation, a DeepSpeed hostfile, mpirun), and the Kubernetes manifests."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_utils import REPO, free_port, run_env, tiny_data, tiny_overrides  # noqa: E402
from lvface.run_folder import RunFolder  # noqa: E402

TRAIN_ARGS = ["--config", "configs/lvface_vit_l_wf42m.yaml", "data.rec=/scratch/wf42m/train.rec"]


def _dry_run(script: str, *args: str, fake_bin: Path | None = None, **env: str) -> list[str]:
    """The script's dry-run output; `fake_bin`: a folder put first on PATH (stand-in commands)."""
    environment = run_env(LVFACE_DRY_RUN="1", **env)
    if fake_bin is not None:
        environment["PATH"] = f"{fake_bin}{os.pathsep}{environment['PATH']}"
    proc = subprocess.run(["bash", str(REPO / "launch" / script), *args], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def _scontrol_without_configuration(folder: Path) -> Path:
    """A stand-in `scontrol` that fails as SLURM 22.05's does on a machine without slurm.conf."""
    folder.mkdir()
    (folder / "scontrol").write_text("#!/bin/sh\necho 'scontrol: fatal: Could not establish a configuration source' >&2\n"
                                     "exit 1\n")
    (folder / "scontrol").chmod(0o755)
    return folder


def _node_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("[")]


@pytest.mark.parametrize("tools", ["as_installed", "unconfigured_scontrol"])
def test_slurm_dry_run_with_a_fake_8_node_allocation(tools, tmp_path):
    """With whatever SLURM tools this machine has (none, or a configured cluster's: scontrol expands the
    list), and with an scontrol that has no configuration (a login node without slurm.conf): the
    script's own expansion."""
    fake_bin = _scontrol_without_configuration(tmp_path / "bin") if tools == "unconfigured_scontrol" else None
    lines = _dry_run("slurm_64gpu.sh", *TRAIN_ARGS[2:], fake_bin=fake_bin, SLURM_JOB_NODELIST="gpu[01-04,10-13]",
                     SLURM_NTASKS_PER_NODE="8", CONFIG="configs/lvface_vit_t_wf42m.yaml")
    nodes = _node_lines(lines)
    assert [line.split("]")[0][1:] for line in nodes] == ["gpu01", "gpu02", "gpu03", "gpu04",
                                                          "gpu10", "gpu11", "gpu12", "gpu13"]
    for index, line in enumerate(nodes):
        assert f"SLURM_NODEID={index} SLURM_PROCID={8 * index}..{8 * index + 7} " in line
        assert "SLURM_NTASKS=64 MASTER_ADDR=gpu01 MASTER_PORT=29500" in line
        assert line.endswith("python -u lvface/train.py --ds_config configs/zero2.json "
                             "--config configs/lvface_vit_t_wf42m.yaml data.rec=/scratch/wf42m/train.rec")
    assert "8 nodes x 8 tasks = 64 ranks" in lines[0]


def test_slurm_script_outside_an_allocation_says_what_to_do():
    environment = run_env()
    environment.pop("SLURM_JOB_NODELIST", None)
    proc = subprocess.run(["bash", "launch/slurm_64gpu.sh"], cwd=REPO, env=environment, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0 and "submit with sbatch" in proc.stderr


def test_deepspeed_hostfile_dry_run_prints_each_nodes_launch(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two nodes\nnodeA slots=8\nnodeB slots=4\n")
    lines = _dry_run("deepspeed_hostfile.sh", str(hostfile), *TRAIN_ARGS)
    nodes = _node_lines(lines)
    assert len(nodes) == 2 and nodes[0].startswith("[nodeA] ranks 0..7:") and nodes[1].startswith("[nodeB] ranks 8..11:")
    for node_rank, line in enumerate(nodes):
        world_info = line.split("--world_info=")[1].split()[0]
        assert json.loads(base64.urlsafe_b64decode(world_info)) == {"nodeA": list(range(8)), "nodeB": list(range(4))}
        assert f"--node_rank={node_rank} --master_addr=nodeA --master_port=29500 lvface/train.py" in line
        assert line.endswith(" ".join(["--ds_config", "configs/zero2.json", *TRAIN_ARGS]))
    full = _dry_run("deepspeed_hostfile.sh", str(REPO / "launch" / "hostfile.example"), *TRAIN_ARGS)
    assert len(_node_lines(full)) == 8 and "64 ranks" in full[1]


def test_mpirun_dry_run_maps_ranks_by_slot():
    lines = _dry_run("mpirun.sh", "-np", "20", "--hostfile", "launch/hostfile.example", "--", *TRAIN_ARGS,
                     NCCL_IB_HCA="mlx5")
    assert lines[0].startswith("# mpirun ") and "-x NCCL_IB_HCA" in lines[0] and "-np 20" in lines[0]
    nodes = _node_lines(lines)
    assert [line.split(":")[0] for line in nodes] == [
        "[node01] ranks 0..7 (OMPI_COMM_WORLD_LOCAL_RANK 0..7)", "[node02] ranks 8..15 (OMPI_COMM_WORLD_LOCAL_RANK 0..7)",
        "[node03] ranks 16..19 (OMPI_COMM_WORLD_LOCAL_RANK 0..3)"]
    assert all(line.endswith(" ".join(TRAIN_ARGS)) for line in nodes)


def _load(name: str) -> dict:
    return yaml.safe_load((REPO / "launch" / "k8s" / name).read_text())


def _check_rdma_pod(spec: dict, container_name: str) -> dict:
    container = next(c for c in spec["containers"] if c["name"] == container_name)
    limits = container["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 8
    assert any(key.startswith("rdma/") or key.endswith("mlnxnics") for key in limits), limits
    assert "IPC_LOCK" in container["securityContext"]["capabilities"]["add"]
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert [p["containerPort"] for p in container["ports"]] == list(range(9400, 9408))
    return container


def test_pytorchjob_requests_gpus_rdma_and_nccl_settings():
    job = _load("pytorchjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob") and job["metadata"]["name"]
    worker = job["spec"]["pytorchReplicaSpecs"]["Worker"]
    assert worker["replicas"] == 8 and job["spec"]["nprocPerNode"] == "8"
    pod = worker["template"]
    assert pod["metadata"]["labels"]["app"] == "lvface"
    container = _check_rdma_pod(pod["spec"], "pytorch")  # the operator requires this container name
    env = {e["name"]: e["value"] for e in container["env"]}
    assert {"NCCL_IB_HCA", "NCCL_SOCKET_IFNAME"} <= set(env)
    script = " ".join(container["command"] + container.get("args", []))
    assert "torchrun --nproc_per_node=8" in script
    assert worker["restartPolicy"] == "ExitCode" and pod["spec"]["terminationGracePeriodSeconds"] >= 300
    # a preemption save (lvface exits 75; torchrun reports 1) is retried: 143 under the ExitCode policy;
    # any other failure keeps its code (1-127: permanent)
    assert _wrapper_exit(container, "torchrun", 1, preempted=True) == 143
    assert _wrapper_exit(container, "torchrun", 1, preempted=False) == 1
    assert _wrapper_exit(container, "torchrun", 0, preempted=False) == 0


def _wrapper_exit(container: dict, launcher: str, code: int, *, preempted: bool) -> int:
    """Run a manifest's container command for real under /bin/sh, with its output folder moved to a temporary
    one and `launcher` (torchrun, mpirun) a stand-in that writes lvface's PREEMPTED marker if asked and
    exits with `code`; the wrapper's own exit code."""
    import re
    import tempfile

    command = container["command"] + container.get("args", [])
    assert command[:2] == ["/bin/sh", "-c"], command
    script = command[2]
    folder = re.search(r"^\s*OUT=(\S+)$", script, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        out, bin_dir = Path(tmp) / "run", Path(tmp) / "bin"
        out.mkdir(), bin_dir.mkdir()
        marker = f"echo samples000000001024 > {RunFolder(out).preempted}; " if preempted else ""
        stand_in = bin_dir / launcher
        stand_in.write_text(f"#!/bin/sh\n{marker}exit {code}\n")
        stand_in.chmod(0o755)
        done = subprocess.run(["/bin/sh", "-c", script.replace(folder, str(out))], capture_output=True, text=True,
                              env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, timeout=60)
    return done.returncode


def test_mpijob_has_a_launcher_and_rdma_workers():
    job = _load("mpijob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v2beta1", "MPIJob") and job["metadata"]["name"]
    spec = job["spec"]
    assert spec["slotsPerWorker"] == 8 and spec["mpiImplementation"] == "OpenMPI"
    replicas = spec["mpiReplicaSpecs"]
    assert replicas["Launcher"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 8
    launcher_pod = replicas["Launcher"]["template"]["spec"]
    launcher = launcher_pod["containers"][0]
    words = launcher["args"][0].replace("\\\n", " ").split()
    assert words[words.index("-np") + 1] == str(8 * spec["slotsPerWorker"])
    assert "lvface/train.py" in words and "NCCL_IB_HCA" in words
    worker = replicas["Worker"]["template"]
    assert worker["metadata"]["labels"]["app"] == "lvface" and worker["spec"]["terminationGracePeriodSeconds"] >= 300
    _check_rdma_pod(worker["spec"], "worker")
    # mpirun reports some rank's code: after a preemption save the launcher exits 75 (the marker is on the
    # checkpoint volume, which the launcher mounts); other codes pass through
    assert any(m["mountPath"] == "/ckpt" for m in launcher["volumeMounts"])
    assert {v["name"] for v in launcher_pod["volumes"]} == {m["name"] for m in launcher["volumeMounts"]}
    assert _wrapper_exit(launcher, "mpirun", 1, preempted=True) == 75
    assert _wrapper_exit(launcher, "mpirun", 137, preempted=False) == 137
    assert _wrapper_exit(launcher, "mpirun", 0, preempted=False) == 0


def test_podmonitor_scrapes_every_local_rank():
    monitor = _load("podmonitor.yaml")
    assert monitor["kind"] == "PodMonitor" and monitor["spec"]["selector"]["matchLabels"] == {"app": "lvface"}
    ports = [endpoint["port"] for endpoint in monitor["spec"]["podMetricsEndpoints"]]
    container = _load("pytorchjob.yaml")["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert ports == [p["name"] for p in container["ports"]]


def _losses(run_dir: Path) -> list[float]:
    import pyarrow.parquet as pq

    return [loss for loss in pq.read_table(RunFolder(run_dir).metrics).to_pydict()["loss"] if loss is not None]


def test_two_torchrun_nodes_on_localhost_train_like_one_two_rank_launch(tmp_path):
    """Two torchrun launches (--nnodes 2, c10d rendezvous on 127.0.0.1) give the same 3 losses as one
    2-rank launch: a second node changes how the ranks meet, not what they compute."""
    data = tiny_data()
    common = ["-m", "lvface.train", "--config", "configs/demo.yaml", *tiny_overrides(data, **{"train.max_steps": "3"})]
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen([*torchrun, "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
                               "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "lvface-test",
                               "--rdzv_conf", f"is_host={node == 0}", *common,
                               f"train.output_dir={tmp_path / 'two_nodes'}"],
                              cwd=REPO, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in (0, 1)]
    one = subprocess.run([*torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), *common,
                          f"train.output_dir={tmp_path / 'one_node'}"], cwd=REPO, env=run_env(), capture_output=True,
                         text=True, timeout=600)
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-4000:]
    assert one.returncode == 0, (one.stdout + one.stderr)[-4000:]
    assert "optimizer steps per epoch of 32 images" in "".join(outputs)  # 2 ranks x 16 images
    two, single = _losses(tmp_path / "two_nodes"), _losses(tmp_path / "one_node")
    assert len(single) == 3
    # Same ranks, same data, same gloo reductions of 2 addends (exact in any order): equal to the bit.
    assert two == single
