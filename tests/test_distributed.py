"""Launcher detection and SLURM host parsing (the collectives themselves are exercised by the
multi-rank tests)."""

from lvface.distributed import _first_slurm_host, detect_launcher

FULL = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}


def test_detect_launcher():
    assert detect_launcher(FULL) == "env"  # deepspeed launcher, torchrun
    assert detect_launcher({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "0"}) == "mpi"
    assert detect_launcher({"PMI_SIZE": "4", "PMI_RANK": "0"}) == "mpi"
    assert detect_launcher({"SLURM_PROCID": "3", "SLURM_NTASKS": "64"}) == "slurm"
    # srun inside a deepspeed/torchrun job: the launcher's complete environment wins
    assert detect_launcher({**FULL, "SLURM_PROCID": "0", "SLURM_NTASKS": "8"}) == "env"
    assert detect_launcher({}) == "single"


def test_first_slurm_host_without_scontrol(monkeypatch):
    monkeypatch.setattr("lvface.distributed.shutil.which", lambda name: None)
    assert _first_slurm_host("gpu[017-024],gpu031") == "gpu017"
    assert _first_slurm_host("node[3,5-7]") == "node3"
    assert _first_slurm_host("single-host") == "single-host"
