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


def build_train_loader(data_cfg, *, rank: int, world_size: int, seed: int, device: torch.device,
                       start_sample: int = 0) -> TrainLoader:
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
    choice = data_cfg.loader
    if choice == "auto":
        choice = "dali" if dali_available() else "torch"
    kwargs = dict(rank=rank, world_size=world_size, seed=seed, device=torch.device(device), start_sample=start_sample)
    if choice == "dali":
        if not dali_available():
            raise ConfigError("data.loader=dali but nvidia-dali is not installed; install nvidia-dali-cuda120 "
                              "(or the build for your CUDA), or set data.loader=torch")
        from lvface.data.dali import DaliTrainLoader

        loader = DaliTrainLoader(index, data_cfg, **kwargs)
    else:
        loader = TorchTrainLoader(index, data_cfg, **kwargs)
    logger.info("%s loader: %d images, %d identities, %d batches of %d per rank per epoch on %d ranks",
                choice, index.num_images, index.num_classes, loader.batches_per_epoch, data_cfg.batch_size,
                world_size)
    return loader
