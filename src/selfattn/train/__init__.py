"""Train a small transformer on selfattn's kernels and watch its heads turn into mechanisms.

    from selfattn.train import TrainConfig, train
    run = train(TrainConfig(task="repeat", n_layer=2, mlp=False, steps=800, snapshot_every=50), out="run")
    # run/loss.png (the phase change), run/attention.png and run/training.html (the heads forming)

model.py (GPT on selfattn.nn.Attention) · tasks.py (generated tasks, text) · loop.py (AdamW, exact-resume
checkpoints, progress) · snapshots.py (detector scores and patterns across training, PNGs, the page).
"""
from .loop import TrainConfig, TrainResult, from_checkpoint, load_checkpoint, resume, train
from .model import GPT, GPTConfig
from .tasks import TASKS, make_task

__all__ = ["TrainConfig", "TrainResult", "train", "resume", "load_checkpoint", "from_checkpoint", "GPT", "GPTConfig",
           "TASKS", "make_task"]
