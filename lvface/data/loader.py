"""The trainer's entry to the data: `build_train_loader` opens and checks the records and picks a loader.

`data.loader`: `dali` (lvface/data/dali.py), `torch` (lvface/data/torch_loader.py) or `auto` (DALI when
it is installed, else torch). Both keep the contract of lvface/data/base.py.
"""
from __future__ import annotations

import logging

import torch

from lvface.config import ConfigError
from lvface.data.base import TrainLoader
from lvface.data.index import RecordIndex
from lvface.data.torch_loader import TorchTrainLoader

logger = logging.getLogger(__name__)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def cuda_driver_version() -> int | None:
    """The newest CUDA version the installed driver supports, in cuDriverGetVersion's units
    (1000 * major + 10 * minor: 13000 is CUDA 13.0), or None where no driver library answers."""
    import ctypes

    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            library = ctypes.CDLL(name)
        except OSError:
            continue
        version = ctypes.c_int(0)
        if library.cuDriverGetVersion(ctypes.byref(version)) == 0:  # needs no cuInit
            return int(version.value)
    return None


def dali_required_driver() -> int:
    """The CUDA driver version the installed DALI build needs: its CUDA major version (the cuda130
    wheels run on any 13.x driver by minor-version compatibility, not on a 12.x one)."""
    import nvidia.dali

    built_with = int(getattr(nvidia.dali, "__cuda_version__", 13000))  # e.g. 13492 for a 13.x toolkit
    return built_with // 1000 * 1000


def _cuda_version_text(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}"


def choose_loader(requested: str, *, device: torch.device, dali_importable: bool, driver_version: int | None,
                  dali_driver: int | None) -> tuple[str, str | None]:
    """Which loader runs: 'dali' or 'torch', and why, when auto passed DALI over (a message to log).

    On the CPU DALI runs CPU pipelines and needs no driver. On a CUDA device the DALI build must fit
    the driver: with loader=auto an old or unreadable driver falls back to the torch loader; an
    explicit data.loader=dali is an error that says what to change.
    """
    if requested == "torch":
        return "torch", None
    if not dali_importable:
        if requested == "dali":
            raise ConfigError("data.loader=dali but nvidia-dali is not installed; install nvidia-dali-cuda130 "
                              "(or the build for your driver's CUDA, e.g. nvidia-dali-cuda120), or set data.loader=torch")
        return "torch", None
    if device.type != "cuda":
        return "dali", None
    if driver_version is not None and dali_driver is not None and driver_version >= dali_driver:
        return "dali", None
    found = ("an unreadable CUDA driver version (libcuda's cuDriverGetVersion did not answer)"
             if driver_version is None else f"a driver for CUDA {_cuda_version_text(driver_version)}")
    need = _cuda_version_text(dali_driver) if dali_driver is not None else "?"
    problem = f"the installed DALI build needs a driver for CUDA >= {need} and this node has {found}"
    if requested == "dali":
        raise ConfigError(f"data.loader=dali: {problem}; update the NVIDIA driver, install the DALI build for the "
                          f"driver's CUDA (e.g. nvidia-dali-cuda120), or set data.loader=torch")
    return "torch", (f"data.loader=auto: {problem}; using the torch loader instead (update the driver or install "
                     f"the matching DALI build for GPU decoding; set data.loader=torch to silence this)")


def build_train_loader(data_cfg, *, rank: int, world_size: int, seed: int, device: torch.device) -> TrainLoader:
    """The training loader of this rank (see ``TrainLoader``), DALI or torch per ``data_cfg.loader``."""
    if not data_cfg.rec:
        raise ConfigError("data.rec is empty; set it to a train.rec file (next to its train.idx) or a folder of "
                          "`lvface pack` shards, or run `lvface synth --out DIR` first")
    try:
        index = RecordIndex.open(data_cfg.rec, num_classes=data_cfg.num_classes)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"data.rec={data_cfg.rec}: {error}") from None
    if data_cfg.num_images and data_cfg.num_images != index.num_images:
        raise ConfigError(f"data.num_images is {data_cfg.num_images} but {data_cfg.rec} holds {index.num_images} "
                          f"images; set data.num_images=0 to read it from the data")
    device = torch.device(device)
    importable = data_cfg.loader != "torch" and dali_available()
    on_cuda = importable and device.type == "cuda"
    choice, fallback = choose_loader(data_cfg.loader, device=device, dali_importable=importable,
                                     driver_version=cuda_driver_version() if on_cuda else None,
                                     dali_driver=dali_required_driver() if on_cuda else None)
    if fallback:
        logger.warning("%s", fallback)
    kwargs = dict(rank=rank, world_size=world_size, seed=seed, device=device)
    if choice == "dali":
        from lvface.data.dali import DaliTrainLoader

        loader = DaliTrainLoader(index, data_cfg, **kwargs)
    else:
        loader = TorchTrainLoader(index, data_cfg, **kwargs)
    logger.info("%s loader: %d images, %d identities, %d batches of %d per rank per epoch on %d ranks",
                choice, index.num_images, index.num_classes, loader.batches_per_epoch, data_cfg.batch_size,
                world_size)
    return loader
