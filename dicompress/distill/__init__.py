"""Recovery distillation: layer-wise (a block or a chain against captured targets) and end-to-end (the
student's prediction against the teacher's), in one process or sharded across torch.distributed ranks."""
from .config import DistillConfig, EndToEndConfig
from .end_to_end import distill_end_to_end
from .engine import draw_batch, rank_world, train
from .layerwise import distill_block
from .losses import LOSSES, get_loss, mse, normalized_l1, normalized_l2

__all__ = ["LOSSES", "DistillConfig", "EndToEndConfig", "distill_block", "distill_end_to_end", "draw_batch",
           "get_loss", "mse", "normalized_l1", "normalized_l2", "rank_world", "train"]
