"""A tiny Stable-Diffusion-class pipeline built from configs with random weights.

No download: the UNet, VAE and CLIP text encoder are built from small configs, and the CLIP
tokenizer from a byte-level vocabulary written on the spot. The images are noise-like (the weights
are random), but every code path of a real pipeline runs: tokenising, text encoding, the denoising
loop, VAE decoding, image-to-image encoding. Tests, notebooks and the CUDA check use it; real runs
pass a model id or a local folder instead.
"""

from __future__ import annotations


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for the bytes 0..255."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) \
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def _byte_vocab_tokenizer():
    """A CLIP tokenizer whose vocabulary is the 256 byte symbols (with and without end-of-word)."""
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_tiny_sd(seed: int = 0, sample_size: int = 16, width: int = 32):
    """A ``StableDiffusionPipeline`` of about 1.5M random parameters.

    ``sample_size`` is the latent side; this VAE has two blocks (one down-sampling), so the default
    image side is twice that (32 pixels). ``width`` scales every block (use 64-128 for a GPU check).
    """
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(width, width * 2), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(width, width * 2),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1, norm_num_groups=8,
        sample_size=sample_size * 2,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513, projection_dim=32,
    ))
    tokenizer = _byte_vocab_tokenizer()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="trailing", steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
