"""Tiny random FLUX.1 and Qwen-Image *pipeline directories*, built offline in a few seconds.

What they are for: testing the real-model code paths (a full diffusers pipeline directory with
model_index.json, text encoders, tokenizers, VAE, scheduler and transformer, in the layout and classes of
FLUX.1-dev and Qwen-Image), and trying the real-model recipes (recipes/flux_w4a8.yaml, ...) small, with
`tools/make_tiny_pipeline.py`. Every weight is random: images, scores and compression numbers measured on
them mean nothing about quality. Nothing is downloaded: the tokenizers are built here from tiny
vocabularies (byte-level where the real one is, so any prompt tokenizes), the models from tiny configs.

Sizes are tiny but the *ratios* the pipelines read are real: 8x VAE downsampling, 16 latent channels
packed 2x2 into the transformer's 64 input channels, CLIP 77 / T5 512 token limits, Qwen-Image's chat
template dropping its first 34 tokens (the tiny Qwen vocabulary holds the template's words, so the
system prompt tokenizes to exactly 34 tokens as with the real tokenizer).
"""
from __future__ import annotations

import json
import re
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

# -- byte-level vocabularies ---------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _byte_table() -> dict[int, str]:
    """The printable stand-ins byte-level BPE (GPT-2, CLIP, Qwen) writes bytes as, in vocabulary order:
    printable Latin-1 bytes stand for themselves, the others take code points from 256 up."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in keep]
    return {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(rest)}


def _byte_text(text: str) -> str:
    return "".join(_byte_table()[b] for b in text.encode("utf-8"))


def _learn_merges(words: list[list[str]]) -> list[tuple[str, str]]:
    """BPE training on a word list, run until every word is one token: merge the most frequent adjacent
    pair (ties: the smallest pair, so the result is deterministic). Greedy left-to-right merges would not do:
    with "at" merged before "c a", "cat" would encode as c|at."""
    words = [list(w) for w in words]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for w in words:
            for pair in zip(w, w[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        words = [_merge(w, best) for w in words]


def _merge(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def _vocab(tokens: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in tokens:
        out.setdefault(t, len(out))
    return out


def _write_bpe(d: Path, vocab: dict[str, int], merges: list[tuple[str, str]], config: dict) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    (d / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return d


# Words a tiny vocabulary spells as one token (the rest of any prompt falls back to characters or bytes).
PROMPT_WORDS = ("a an the of and in on with at two three photo painting portrait red blue green white black "
                "cat cats dog dogs bird tree house city street night sky sea mountain man woman").split()


def _clip_tokenizer(d: Path):
    """CLIP's layout: 256 byte symbols, the same with the end-of-word mark, merged words, then
    <|startoftext|> / <|endoftext|> last (as in openai/clip-vit-large-patch14)."""
    from transformers import CLIPTokenizer
    chars = list(_byte_table().values())
    words = [[*_byte_text(w)[:-1], _byte_text(w)[-1] + "</w>"] for w in PROMPT_WORDS if len(w) > 1]
    merges = _learn_merges(words)
    vocab = _vocab(chars + [c + "</w>" for c in chars] + [a + b for a, b in merges]
                   + ["<|startoftext|>", "<|endoftext|>"])
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
              "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
              "do_lower_case": True}
    return CLIPTokenizer.from_pretrained(str(_write_bpe(d, vocab, merges, config)))


def _t5_tokenizer(d: Path):
    """T5's layout: a Unigram model (<pad> 0, </s> 1, <unk> 2, pieces, 100 sentinels last) with Metaspace
    word boundaries; characters outside the pieces become <unk>, as with the real SentencePiece model."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast
    chars = [chr(c) for c in range(33, 127)]
    pieces = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
              + [("▁" + w, -5.0) for w in PROMPT_WORDS] + [(c, -10.0) for c in chars]
              + [(f"<extra_id_{i}>", 0.0) for i in reversed(range(100))])
    tok = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    specials = ["<pad>", "</s>", "<unk>"] + [f"<extra_id_{i}>" for i in range(100)]
    tok.add_special_tokens(specials)
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    config = {"tokenizer_class": "T5Tokenizer", "model_max_length": 512, "eos_token": "</s>", "unk_token": "<unk>",
              "pad_token": "<pad>", "extra_ids": 100, "additional_special_tokens": specials[3:]}
    (d / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return T5TokenizerFast.from_pretrained(str(d))


# Qwen2.5's special tokens, in their real order (ids follow the vocabulary, as 151643.. follow Qwen's).
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
# The words of QwenImagePipeline's prompt template: one token each, so its system prompt is 34 tokens long
# as with the real tokenizer (the pipeline drops exactly that many; checked against diffusers at build time).
QWEN_TEMPLATE_TEXT = ("system\nuser\nassistant\nDescribe the image by detailing the color, shape, size, texture, "
                      "quantity, text, spatial relationships of the objects and background:")
QWEN_MAX_LENGTH = 131072   # the real tokenizer_config's model_max_length (the pipeline passes its own max_length)


def _qwen_tokenizer(d: Path):
    """Qwen2's layout: byte-level BPE (vocab.json + merges.txt, every byte a token, so nothing is unknown),
    the chat special tokens added after the vocabulary."""
    from transformers import Qwen2Tokenizer
    text = QWEN_TEMPLATE_TEXT + " " + " ".join(PROMPT_WORDS)
    words = [list(_byte_text(w)) for w in re.findall(r" ?[A-Za-z]+", text)]   # Qwen's letters-word rule
    merges = _learn_merges(words)
    vocab = _vocab(list(_byte_table().values()) + [a + b for a, b in merges])
    added = {str(len(vocab) + i): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                   "normalized": False, "single_word": False} for i, t in enumerate(QWEN_SPECIALS)}
    config = {"tokenizer_class": "Qwen2Tokenizer", "model_max_length": QWEN_MAX_LENGTH, "added_tokens_decoder": added,
              "additional_special_tokens": list(QWEN_SPECIALS[1:]), "bos_token": None, "unk_token": None,
              "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "errors": "replace",
              "split_special_tokens": False, "clean_up_tokenization_spaces": False}
    return Qwen2Tokenizer.from_pretrained(str(_write_bpe(d, vocab, merges, config)))


# -- models --------------------------------------------------------------------------------------------------
# Widths are tiny; what the pipelines read from configs is real: 16 latent channels, 8x spatial VAE
# (4 FLUX VAE levels, 3 Qwen temporal-downsample flags), 2x2 packing (transformer in_channels = 4 * 16),
# joint_attention_dim = the text encoder's width, FLUX's pooled_projection_dim = CLIP's width, and
# axes_dims_rope summing to attention_head_dim.
LATENT_CHANNELS = 16
HEADS, HEAD_DIM, AXES_DIMS_ROPE = 2, 16, (4, 6, 6)
CLIP_WIDTH, T5_WIDTH, QWEN_WIDTH = 32, 64, 64


def _clip_text_encoder(tok):
    from transformers import CLIPTextConfig, CLIPTextModel
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=CLIP_WIDTH, intermediate_size=4 * CLIP_WIDTH, projection_dim=CLIP_WIDTH,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=tok.model_max_length,
        hidden_act="quick_gelu", bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))


def _t5_encoder(tok, **widths):
    from transformers import T5Config, T5EncoderModel
    shape = {"d_model": T5_WIDTH, "d_kv": T5_WIDTH // 4, "num_heads": 4, "d_ff": 160, "num_layers": 2, **widths}
    return T5EncoderModel(T5Config(   # T5 v1.1 XXL's shape: gated GELU, untied head, relative positions
        vocab_size=len(tok), **shape,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, is_encoder_decoder=False, use_cache=False,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id))


def _flux_vae():
    from diffusers import AutoencoderKL
    return AutoencoderKL(   # FLUX.1's VAE config, narrower: 4 levels (8x), no quant convs, scale and shift
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 32, 32), layers_per_block=1,
        norm_num_groups=4, latent_channels=LATENT_CHANNELS, sample_size=64, scaling_factor=0.3611,
        shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)


def _flux_transformer(joint_attention_dim: int = T5_WIDTH, **widths):
    from diffusers import FluxTransformer2DModel
    shape = {"num_layers": 2, "num_single_layers": 2, "attention_head_dim": HEAD_DIM, "num_attention_heads": HEADS,
             "axes_dims_rope": AXES_DIMS_ROPE, **widths}
    return FluxTransformer2DModel(   # FLUX.1-dev: guidance-distilled (guidance_embeds)
        patch_size=1, in_channels=4 * LATENT_CHANNELS, joint_attention_dim=joint_attention_dim,
        pooled_projection_dim=CLIP_WIDTH, guidance_embeds=True, **shape)


def _flux_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                           max_image_seq_len=4096)


def _qwen_text_encoder(tok):
    """Qwen2.5-VL (the 7B's layout: GQA, multimodal RoPE, untied head, a vision tower the pipeline never
    runs but the class carries). The config is flat, as in Qwen-Image's text_encoder/config.json."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    ids = tok.convert_tokens_to_ids
    vision = dict(depth=2, hidden_size=32, intermediate_size=80, num_heads=2, out_hidden_size=QWEN_WIDTH,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[1])
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        vocab_size=len(tok), hidden_size=QWEN_WIDTH, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_window_layers=2, rms_norm_eps=1e-6,
        max_position_embeddings=QWEN_MAX_LENGTH,
        rope_theta=1e6, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},   # sums to head_dim / 2
        bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), tie_word_embeddings=False,
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"), vision_config=vision))


def _qwen_vae():
    from diffusers import AutoencoderKLQwenImage
    return AutoencoderKLQwenImage(base_dim=8, z_dim=LATENT_CHANNELS, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                  attn_scales=[], temperal_downsample=[False, True, True])


def _qwen_transformer():
    from diffusers import QwenImageTransformer2DModel
    return QwenImageTransformer2DModel(   # out_channels: one latent; the 2x2 packing is the pipeline's
        patch_size=2, in_channels=4 * LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_layers=2,
        attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=QWEN_WIDTH,
        guidance_embeds=False, axes_dims_rope=AXES_DIMS_ROPE)


def _qwen_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
                                           max_image_seq_len=8192, shift_terminal=0.02,
                                           time_shift_type="exponential")


# -- pipelines -----------------------------------------------------------------------------------------------


def _seeded(seed: int, salt: int, build, *args):
    """Each part from its own seed, so parts do not shift each other's weights; the caller's RNG is left as is."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1009 + salt)
        return build(*args)


def _save(pipe, out_dir, dtype: torch.dtype) -> Path:
    out = Path(out_dir)
    for part in pipe.components.values():   # real checkpoints are stored in bf16
        if isinstance(part, torch.nn.Module):   # nn.Module.to: ModelMixin.to(dtype) warns of fp32 modules even
            torch.nn.Module.to(part, dtype)     # when it has none (diffusers 0.42)
    pipe.save_pretrained(str(out), safe_serialization=True)
    return out


def make_tiny_flux_pipeline(out_dir, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                            t5: dict | None = None, transformer: dict | None = None) -> Path:
    """A random FLUX.1-dev-shaped pipeline directory at `out_dir` (FluxPipeline.save_pretrained). `t5` / `transformer`
    override the T5 encoder's (d_model, d_kv, num_heads, d_ff, num_layers) and the transformer's (num_layers,
    num_single_layers, attention_head_dim, num_attention_heads, axes_dims_rope) shapes, e.g. the real widths with
    few layers (tools/bench_flux_width.py); the transformer's joint_attention_dim follows the T5 width."""
    t5, transformer = t5 or {}, transformer or {}
    transformer = {"joint_attention_dim": t5.get("d_model", T5_WIDTH), **transformer}
    from diffusers import FluxPipeline
    with tempfile.TemporaryDirectory() as tmp:
        tok, tok2 = _clip_tokenizer(Path(tmp) / "clip"), _t5_tokenizer(Path(tmp) / "t5")
    pipe = FluxPipeline(tokenizer=tok, tokenizer_2=tok2, text_encoder=_seeded(seed, 1, _clip_text_encoder, tok),
                        text_encoder_2=_seeded(seed, 2, lambda: _t5_encoder(tok2, **t5)),
                        vae=_seeded(seed, 3, _flux_vae),
                        transformer=_seeded(seed, 4, lambda: _flux_transformer(**transformer)),
                        scheduler=_flux_scheduler())
    return _save(pipe, out_dir, dtype)


def make_tiny_qwenimage_pipeline(out_dir, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A random Qwen-Image-shaped pipeline directory at `out_dir` (QwenImagePipeline.save_pretrained)."""
    from diffusers import QwenImagePipeline
    with tempfile.TemporaryDirectory() as tmp:
        tok = _qwen_tokenizer(Path(tmp) / "qwen")
    pipe = QwenImagePipeline(tokenizer=tok, text_encoder=_seeded(seed, 1, _qwen_text_encoder, tok),
                             vae=_seeded(seed, 2, _qwen_vae), transformer=_seeded(seed, 3, _qwen_transformer),
                             scheduler=_qwen_scheduler())
    _check_template(pipe)
    return _save(pipe, out_dir, dtype)


def _check_template(pipe) -> None:
    """The pipeline drops the first `prompt_template_encode_start_idx` tokens (the system prompt) of every
    encoded prompt; a vocabulary that spells the template in more tokens would leak it into the embeddings."""
    prefix = pipe.prompt_template_encode.split("{}")[0]
    n, want = len(pipe.tokenizer(prefix).input_ids), pipe.prompt_template_encode_start_idx
    if n != want:
        raise RuntimeError(f"the tiny Qwen tokenizer spells QwenImagePipeline's template prefix in {n} tokens; "
                           f"the pipeline drops {want}: update QWEN_TEMPLATE_TEXT to this diffusers' template")
