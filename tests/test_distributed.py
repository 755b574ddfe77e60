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


SLURM_TASK = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[01-02]"}


def test_slurm_is_checked_before_pmi():
    # srun --mpi=pmix / --mpi=pmi2 set PMIx / PMI variables in every task beside SLURM's own
    assert detect_launcher({**SLURM_TASK, "PMIX_RANK": "5", "PMIX_NAMESPACE": "slurm.pmix.1.0"}) == "slurm"
    assert detect_launcher({**SLURM_TASK, "PMI_SIZE": "16", "PMI_RANK": "5", "PMI_FD": "7"}) == "slurm"
    # mpirun in an sbatch script: every rank inherits the batch step's SLURM_PROCID=0, Open MPI's own
    # variables say which rank it is
    batch_step = {"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_NODELIST": "gpu[01-02]"}
    assert detect_launcher({**batch_step, "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_RANK": "5",
                            "PMIX_RANK": "5"}) == "mpi"
    # a launcher's complete environment still wins over both
    assert detect_launcher({**FULL, **SLURM_TASK, "PMIX_RANK": "5"}) == "env"


def test_first_slurm_host_without_scontrol(monkeypatch):
    monkeypatch.setattr("lvface.distributed.shutil.which", lambda name: None)
    assert _first_slurm_host("gpu[017-024],gpu031") == "gpu017"
    assert _first_slurm_host("node[3,5-7]") == "node3"
    assert _first_slurm_host("single-host") == "single-host"
