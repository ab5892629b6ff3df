"""FLUX (FluxTransformer2DModel): 19 double-stream MMDiT blocks then 38 single-stream blocks in FLUX.1."""
from __future__ import annotations

import torch

from .base import ArchAdapter, InputGroup, NormFold, RowsFold, register_arch


@register_arch
class FluxAdapter(ArchAdapter):
    name = "flux"
    model_classes = ("FluxTransformer2DModel",)
    block_lists = (("transformer_blocks", "double"), ("single_transformer_blocks", "single"))
    quant_include = ("transformer_blocks.*", "single_transformer_blocks.*")
    # AdaLN modulation (norm*.linear), embedders and the final proj_out stay high precision (LRQ-DiT).
    quant_keep = ("*norm*", "*embed*", "proj_out")
    attention_linears = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                         "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
    # single blocks fuse attention-out and MLP-down into proj_out; proj_mlp is the MLP up-projection
    ffn_linears = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
                   "proj_mlp", "proj_out")
    block_count_keys = {"transformer_blocks": "num_layers", "single_transformer_blocks": "num_single_layers"}
    per_sample_inputs = ("hidden_states", "encoder_hidden_states", "temb")
    shared_inputs = ("image_rotary_emb",)
    model_shared_inputs = ("img_ids", "txt_ids")     # forward kwargs without a batch dim (model-level capture)
    # AdaLayerNormZero: linear -> (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp); the
    # single block's AdaLayerNormZeroSingle -> (shift, scale, gate). Not folded, kept online: ff.net.2 /
    # ff_context.net.2 (after a GELU) and the single block's proj_out, whose input [attn | GELU(mlp)] is
    # half behind a GELU. q/k outputs go through RMSNorm (qk-norm), so nothing folds into their rows.
    input_groups = {
        "double": (
            InputGroup(("attn.to_q", "attn.to_k", "attn.to_v"), NormFold("norm1.norm", "norm1.linear", 6, 0)),
            InputGroup(("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
                       NormFold("norm1_context.norm", "norm1_context.linear", 6, 0)),
            InputGroup(("attn.to_out.0", "attn.to_add_out"), RowsFold(("attn.to_v", "attn.add_v_proj"))),
            InputGroup(("ff.net.0.proj",), NormFold("norm2", "norm1.linear", 6, 3)),
            InputGroup(("ff_context.net.0.proj",), NormFold("norm2_context", "norm1_context.linear", 6, 3)),
        ),
        "single": (
            InputGroup(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), NormFold("norm.norm", "norm.linear", 3, 0)),
        ),
    }

    def run_block(self, block, inputs):
        enc, hid = block(hidden_states=inputs["hidden_states"], encoder_hidden_states=inputs["encoder_hidden_states"],
                         temb=inputs["temb"], image_rotary_emb=inputs.get("image_rotary_emb"))
        return {"hidden_states": hid, "encoder_hidden_states": enc}

    def output_head(self, model, hidden_states, temb):
        return model.proj_out(model.norm_out(hidden_states, temb))

    def single_from_double(self, model, block):
        """A FluxSingleTransformerBlock from a FluxTransformerBlock's image branch (Amber-Image's hybrid stream):
        the image modulation's (shift, scale, gate) of attention, q/k/v and qk-norms, the MLP up-projection as
        proj_mlp, and proj_out = [to_out.0 | ff.net.2] side by side (biases summed). Text tokens then go through
        the image weights; text-branch weights are dropped. Not exact: the single block runs attention and MLP
        in parallel on one normalised input under one gate, where the double block runs the MLP after the
        attention residual under its own modulation, so the converted block is an initialisation to distil."""
        # lazy: diffusers' model modules take seconds to load; arch/ itself loads without them
        from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock
        cfg = model.config
        dim = cfg.num_attention_heads * cfg.attention_head_dim
        p = next(block.parameters())
        single = FluxSingleTransformerBlock(dim, cfg.num_attention_heads, cfg.attention_head_dim).to(p.device, p.dtype)
        with torch.no_grad():
            lin = block.norm1.linear                       # rows: shift, scale, gate (msa) | shift, scale, gate (mlp)
            single.norm.linear.weight.copy_(lin.weight[: 3 * dim])
            single.norm.linear.bias.copy_(lin.bias[: 3 * dim])
            for name in ("to_q", "to_k", "to_v", "norm_q", "norm_k"):
                single.attn.get_submodule(name).load_state_dict(block.attn.get_submodule(name).state_dict())
            single.proj_mlp.load_state_dict(block.ff.net[0].proj.state_dict())
            out, down = block.attn.to_out[0], block.ff.net[2]
            single.proj_out.weight.copy_(torch.cat([out.weight, down.weight], dim=1))
            single.proj_out.bias.copy_(out.bias + down.bias)
        return single

    def synthetic_inputs(self, model, batch, generator, grid=(8, 8)):
        cfg = model.config
        (h, w), txt = grid, 8                          # an h x w token grid, 8 text tokens
        kw = dict(generator=generator)
        ids = torch.zeros(h, w, 3)
        ids[..., 1] = torch.arange(h)[:, None]
        ids[..., 2] = torch.arange(w)[None, :]
        out = dict(hidden_states=torch.randn(batch, h * w, cfg.in_channels, **kw),
                   encoder_hidden_states=torch.randn(batch, txt, cfg.joint_attention_dim, **kw),
                   pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, **kw),
                   timestep=torch.rand(batch, **kw), img_ids=ids.view(-1, 3), txt_ids=torch.zeros(txt, 3))
        if cfg.guidance_embeds:
            out["guidance"] = torch.full((batch,), 3.5)
        return out
