"""Dense2MoE: dense FFNs split into a shared expert and top-k routed experts (experts.py: the module and its
grouped execution; partition.py: the split and the router initialisation as pure functions; single.py: FLUX single blocks' MLPs;
manifest_op.py:
the `moe_ffn` manifest op that rebuilds MoE FFNs at load time)."""
from .experts import Expert, MoEFFN, Router, dense_parts, moe_from_dense
from .single import AttnOutPlusMLP, install_single_moe, single_mlp_parts
from .partition import (PARTITIONS, balanced_assign, expert_mass, fit_router, partition_cluster,
                        partition_importance, partition_random, router_recall, split_widths, switch_balance_loss,
                        topk_coverage)

__all__ = ["PARTITIONS", "AttnOutPlusMLP", "Expert", "MoEFFN", "Router", "balanced_assign", "dense_parts", "expert_mass", "fit_router",
           "moe_from_dense", "partition_cluster", "partition_importance", "partition_random", "router_recall",
           "split_widths", "switch_balance_loss", "topk_coverage", "install_single_moe", "single_mlp_parts"]
