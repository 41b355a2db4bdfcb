"""Run by test_finetune_distributed.py under torchrun (2 processes, gloo): one head run and
one full run in the caller's process group. Arguments: DATA MODEL OUT_DIR."""

import sys

import torch.distributed as dist

from imvec.finetune import FinetuneConfig, finetune

HEAD = dict(mode="head", epochs=2, batch_size=8, image_size=32, dropout=0.0,
            augment_views=2, val_fraction=0.25, workers=0)
FULL = dict(mode="full", epochs=1, batch_size=4, image_size=32, val_fraction=0.25, workers=0)


def main(data: str, model: str, out: str) -> None:
    dist.init_process_group("gloo")  # finetune joins a group it finds
    try:
        finetune(FinetuneConfig(data, model, f"{out}/head", **HEAD))
        finetune(FinetuneConfig(data, model, f"{out}/full", **FULL))
        assert dist.is_initialized()  # not torn down by finetune: the group is ours
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
