"""End to end: the demo config trained by 2 DeepSpeed ZeRO-2 ranks on gloo, and the one-line errors.

The DeepSpeed run is the slowest test of the suite (a few minutes on 2 cores): it is the same command
the README's demo runs, on a freshly generated synthetic data set.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lvface.checkpoint.files import LATEST
from lvface.distributed import free_port
from lvface.run_folder import RunFolder
from run_utils import run_env as _env

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    from lvface.data.synthetic import write_synthetic_dataset

    out = tmp_path_factory.mktemp("demo") / "data"
    write_synthetic_dataset(out, num_identities=300, images_per_identity=20, val_identities=100, val_pairs=600,
                            seed=0)
    return out


@pytest.fixture(scope="module")
def demo_run(demo_data, tmp_path_factory) -> tuple[Path, str]:
    """The demo config trained by `deepspeed --num_gpus 2` (ZeRO-2 on gloo); (output dir, log)."""
    run_dir = tmp_path_factory.mktemp("demo_run") / "run"
    cmd = [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
        str(REPO / "lvface" / "train.py"), "--ds_config", str(REPO / "configs" / "zero2.json"),
        "--config", str(REPO / "configs" / "demo.yaml"),
        f"data.rec={demo_data / 'train.rec'}", f"eval.bins=[{demo_data / 'val.bin'}]", f"train.output_dir={run_dir}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1200)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    return run_dir, log


def test_deepspeed_zero2_demo_learns(demo_run):
    run_dir, log = demo_run
    summary = json.loads(RunFolder(run_dir).summary.read_text())
    assert summary["last_loss"] < 0.8 * summary["first_loss"], summary
    first, last = summary["first_accuracy"]["val"], summary["last_accuracy"]["val"]
    assert first < 0.70, summary  # untrained: near chance
    assert last >= first + 0.15, summary

    # The checkpoint: DeepSpeed's ZeRO-2 shards of both ranks, the head, and a plain backbone that loads
    # strictly into the architecture.
    folder = Path(summary["checkpoint"])
    assert (folder.parent / LATEST).read_text().strip() == folder.name
    assert sorted(p.name for p in folder.glob("*zero_pp_rank_*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    optimizer = torch.load(folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
    assert int(optimizer["optimizer_state_dict"]["zero_stage"]) == 2
    assert optimizer["optimizer_state_dict"]["partition_count"] in (2, [2, 2])
    from lvface.models import build_vit

    model = build_vit("vit_demo")
    model.load_state_dict(torch.load(folder / "backbone.pt", weights_only=True), strict=True)
    shards = [torch.load(folder / f"head_shard_{r:05d}_of_00002.pt", weights_only=True) for r in range(2)]
    assert [s["weight"].shape for s in shards] == [(150, 512), (150, 512)]
    assert [s["class_start"] for s in shards] == [0, 150]
    assert shards[0]["stage"] == "stable"  # the demo ends in its second stage
    state = json.loads((folder / "train_state.json").read_text())
    assert state["step"] == summary["steps"] and state["world_size"] == 2


def _run_single(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """`python -m lvface.train` on the demo config (output in tmp_path/run unless args say otherwise)."""
    cmd = [sys.executable, "-m", "lvface.train", "--config", str(REPO / "configs" / "demo.yaml"),
           f"train.output_dir={tmp_path / 'run'}", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)


def test_config_typo_is_a_one_line_error(tmp_path):
    proc = _run_single(["optimizer.weight_decy=0.1"], tmp_path)
    assert proc.returncode == 2
    assert "lvface: error:" in proc.stderr
    assert "unknown config key 'optimizer.weight_decy'; did you mean 'optimizer.weight_decay'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_data_and_missing_idx_are_one_line_errors(demo_data, tmp_path):
    proc = _run_single([f"data.rec={tmp_path / 'nowhere' / 'train.rec'}"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"data.rec={tmp_path / 'nowhere' / 'train.rec'}" in proc.stderr and "not found" in proc.stderr
    assert "Traceback" not in proc.stderr

    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / "train.rec").write_bytes((demo_data / "train.rec").read_bytes())
    proc = _run_single([f"data.rec={lonely / 'train.rec'}"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert ".idx" in proc.stderr and str(lonely) in proc.stderr
    assert "Traceback" not in proc.stderr


def _losses(run_dir: Path) -> list[float]:
    import pyarrow.parquet as pq

    table = pq.read_table(RunFolder(run_dir).metrics).to_pydict()
    return [loss for loss in table["loss"] if loss is not None]


def test_torchrun_and_mpirun_train_the_same_steps(demo_data, tmp_path):
    """The same 3 steps launched by torchrun (env://) and by mpirun (DeepSpeed's MPI discovery through
    mpi4py) give the same losses: rank discovery changes nothing but how ranks meet."""
    common = ["--config", str(REPO / "configs" / "demo.yaml"), f"data.rec={demo_data / 'train.rec'}",
              "eval.bins=[]", "train.max_steps=3", "train.log_every=1"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port()), "-m", "lvface.train", *common, f"train.output_dir={tmp_path / 'torchrun'}"]
    mpirun = ["bash", str(REPO / "launch" / "mpirun.sh"), "-np", "2", "--", *common,
              f"train.output_dir={tmp_path / 'mpirun'}"]
    for cmd in (torchrun, mpirun):
        proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    first, second = _losses(tmp_path / "torchrun"), _losses(tmp_path / "mpirun")
    assert len(first) == 3
    assert first == second  # bit-identical: same ranks, data and threads (OMP_NUM_THREADS=1); only the launcher differs


def test_resume_on_another_world_size(demo_data, demo_run, tmp_path):
    """The 2-rank demo checkpoint resumed by one process: DeepSpeed loads it through a universal
    checkpoint, the head is re-split, and what the new run saves before any step is the same model."""
    run_dir, _ = demo_run
    old = Path(json.loads(RunFolder(run_dir).summary.read_text())["checkpoint"])
    old_state = json.loads((old / "train_state.json").read_text())
    # max_steps counts steps of the global batch the run started with (2 ranks): the same number means
    # the same samples on one rank, so the resumed run has nothing left to train and saves at once.
    proc = _run_single([f"data.rec={demo_data / 'train.rec'}", "eval.bins=[]", f"checkpoint.resume={old}",
                        f"train.max_steps={old_state['step']}"], tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "resuming a 2-rank checkpoint on 1 ranks" in proc.stderr
    new = RunFolder(tmp_path / "run").checkpoints / f"samples{old_state['samples_seen']:012d}"
    new_state = json.loads((new / "train_state.json").read_text())
    assert (new_state["samples_seen"], new_state["epoch"], new_state["position"], new_state["world_size"]) == (
        old_state["samples_seen"], old_state["epoch"], old_state["position"], 1)
    before = torch.load(old / "backbone.pt", weights_only=True)
    after = torch.load(new / "backbone.pt", weights_only=True)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    halves = [torch.load(old / f"head_shard_{r:05d}_of_00002.pt", weights_only=True) for r in range(2)]
    whole = torch.load(new / "head_shard_00000_of_00001.pt", weights_only=True)
    for key in ("weight", "prototypes", "exp_avg", "exp_avg_sq", "row_steps"):
        assert torch.equal(torch.cat([half[key] for half in halves]), whole[key]), key


def test_resume_continues_exactly(demo_data, tmp_path):
    """4 steps in one go equal 2 steps, a stop, and a resume for 2 more: same losses and learning rates
    (data position, head sampling counter, both optimizers and the schedule are all restored). All 4
    steps lie in the warmup, where the schedule does not depend on max_steps."""
    common = [f"data.rec={demo_data / 'train.rec'}", "eval.bins=[]", "train.log_every=1"]
    runs = [(tmp_path / "straight", ["train.max_steps=4"]),
            (tmp_path / "resumed", ["train.max_steps=2"]),
            (tmp_path / "resumed", ["train.max_steps=4", "checkpoint.resume=auto"])]
    for out, extra in runs:
        proc = _run_single([*common, f"train.output_dir={out}", *extra], tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    import pyarrow.parquet as pq

    straight = pq.read_table(RunFolder(tmp_path / "straight").metrics).to_pydict()
    resumed = pq.read_table(RunFolder(tmp_path / "resumed").metrics).to_pydict()
    assert resumed["step"] == straight["step"] == [1, 2, 3, 4]
    assert resumed["loss"] == straight["loss"]
    assert resumed["lr"] == straight["lr"]
