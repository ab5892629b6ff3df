"""Qwen-Image (QwenImageTransformer2DModel): 60 dual-stream MMDiT blocks with img_/txt_ branches."""
from __future__ import annotations

import torch

from .base import ArchAdapter, InputGroup, NormFold, RowsFold, register_arch


@register_arch
class QwenImageAdapter(ArchAdapter):
    name = "qwenimage"
    model_classes = ("QwenImageTransformer2DModel",)
    block_lists = (("transformer_blocks", "double"),)
    quant_include = ("transformer_blocks.*",)
    # img_mod / txt_mod are the AdaLN modulation linears; img_in / txt_in / time embed are embedders.
    quant_keep = ("*norm*", "*_mod.*", "*embed*", "img_in", "txt_in", "proj_out")
    attention_linears = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                         "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
    ffn_linears = ("img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")
    block_count_keys = {"transformer_blocks": "num_layers"}
    per_sample_inputs = ("hidden_states", "encoder_hidden_states", "temb", "encoder_hidden_states_mask")
    shared_inputs = ("image_rotary_emb",)
    model_shared_inputs = ()
    # img_mod.1 / txt_mod.1 -> (shift1, scale1, gate1, shift2, scale2, gate2), applied as
    # norm(x)·(1 + scale) + shift (also with zero_cond_t: both halves are rows of the same linear).
    # Kept online: img_mlp.net.2 / txt_mlp.net.2 (after a GELU).
    input_groups = {
        "double": (
            InputGroup(("attn.to_q", "attn.to_k", "attn.to_v"), NormFold("img_norm1", "img_mod.1", 6, 0)),
            InputGroup(("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
                       NormFold("txt_norm1", "txt_mod.1", 6, 0)),
            InputGroup(("attn.to_out.0", "attn.to_add_out"), RowsFold(("attn.to_v", "attn.add_v_proj"))),
            InputGroup(("img_mlp.net.0.proj",), NormFold("img_norm2", "img_mod.1", 6, 3)),
            InputGroup(("txt_mlp.net.0.proj",), NormFold("txt_norm2", "txt_mod.1", 6, 3)),
        ),
    }

    def run_block(self, block, inputs):
        # the model hands its blocks a bool mask; captured inputs are stored as floats, and a float mask would be
        # added to the attention scores (+0 / +1) instead of masking the padded text tokens out
        mask = inputs.get("encoder_hidden_states_mask")
        enc, hid = block(hidden_states=inputs["hidden_states"], encoder_hidden_states=inputs["encoder_hidden_states"],
                         encoder_hidden_states_mask=None if mask is None else mask.bool(),
                         temb=inputs["temb"], image_rotary_emb=inputs.get("image_rotary_emb"))
        return {"hidden_states": hid, "encoder_hidden_states": enc}

    def output_head(self, model, hidden_states, temb):
        # zero_cond_t models feed blocks a doubled temb (two halves stacked on dim 0); the head uses the first
        if temb.shape[0] == 2 * hidden_states.shape[0]:
            temb = temb.chunk(2, dim=0)[0]
        return model.proj_out(model.norm_out(hidden_states, temb))

    def synthetic_inputs(self, model, batch, generator, grid=(8, 8)):
        cfg = model.config
        (h, w), txt = grid, 8
        kw = dict(generator=generator)
        return dict(hidden_states=torch.randn(batch, h * w, cfg.in_channels, **kw),
                    encoder_hidden_states=torch.randn(batch, txt, cfg.joint_attention_dim, **kw),
                    encoder_hidden_states_mask=torch.ones(batch, txt, dtype=torch.long),
                    timestep=torch.rand(batch, **kw), img_shapes=[(1, h, w)] * batch)
