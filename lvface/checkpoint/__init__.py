"""Checkpoints: writing, verifying and resuming training, and reading backbones from any checkpoint.

- `manager`: the trainer's `Checkpointer` (resume, load, save, pruning) and the save/resume machinery;
- `state`: `TrainState`, the run's position saved as train_state.json;
- `head`: the class-sharded head's per-rank shard files, re-split on another world size;
- `manifest`: every checkpoint file's size and SHA-256, and their verification;
- `files`: what a checkpoint folder holds, the `latest` pointer, and the one reader of backbone
  weights from any checkpoint users bring (eval, embed, export, checkpoint.init_backbone).

Nothing is imported here, so that readers of `files` do not pull in DeepSpeed's side.
"""
