"""The parts of the embedded pipeline, built from small configs: tokenizer, text encoder, VAE, UNet,
scheduler. Everything here is stock diffusers / transformers, so the saved model loads anywhere
with `DiffusionPipeline.from_pretrained` and no custom code.
"""

from __future__ import annotations

from dataclasses import dataclass

import string

from kiln.embedded import text_captions
from kiln.embedded.captions import vocabulary_texts

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
MAX_TOKENS = 48
"""Tokens per prompt, with <bos> and <eos>; the longest caption of the grammar, its quoted word
spelt letter by letter, is under."""
LATENT_CHANNELS = 4
LATENT_FACTOR = 2
"""64x64 pictures <-> 32x32x4 latents (4 channels, so the stock inpainting pipeline takes the
UNet as a legacy inpainting model). A letter is 8 pixels wide, 4 latent cells: a factor of 4
left it 2 cells, and its strokes came back from the autoencoder as blobs."""


@dataclass(frozen=True)
class Sizes:
    """Widths of the three networks; `tiny` is the smoke test's, `full` the shipped model's."""

    text_hidden: int = 128
    text_layers: int = 3
    text_heads: int = 4
    vae_channels: tuple[int, ...] = (32, 64)
    unet_channels: tuple[int, ...] = (32, 64, 128, 128)
    unet_heads: int = 4


FULL = Sizes()
TINY = Sizes(
    text_hidden=32,
    text_layers=1,
    text_heads=2,
    vae_channels=(16, 16),
    unet_channels=(16, 16, 16, 16),
    unet_heads=2,
)


def _backend_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    from tokenizers import Regex

    pre = pre_tokenizers.Whitespace()
    def words(texts):
        return {w for text in texts for w, _ in pre.pre_tokenize_str(text.lower())}

    # The shape grammar's words keep the ids they had before words were drawn (the shipped text
    # encoder was fine-tuned from that model); the new words and the letters follow.
    shape_words = sorted(words(vocabulary_texts()))
    new = words(text_captions.vocabulary_texts()) | set(string.ascii_lowercase) | {'"'}
    tokens = [PAD, UNK, BOS, EOS, *shape_words, *sorted(new - set(shape_words))]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Replace(Regex("[\u201c\u201d\u201e]"), '"'),
            normalizers.Lowercase(),
        ]
    )
    # A quoted run of letters is spelt: `"kiln"` -> `"` k i l n `"`; other text splits into words.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex('"[^"]*"'), behavior="isolated"),
            pre_tokenizers.Split(Regex('[a-z](?=[a-z]*")'), behavior="isolated"),
            pre,
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return tok


def build_tokenizer():
    """A word-level tokenizer over the grammar's vocabulary, spelling quoted words letter by letter
    (so a word never seen in training is still 4 known letters); any other word becomes <unk>."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=_backend_tokenizer(),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=MAX_TOKENS,
        padding_side="right",
    )


def build_text_encoder(tokenizer, sizes: Sizes = FULL):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=sizes.text_hidden,
        intermediate_size=sizes.text_hidden * 2,
        projection_dim=sizes.text_hidden,
        num_hidden_layers=sizes.text_layers,
        num_attention_heads=sizes.text_heads,
        max_position_embeddings=MAX_TOKENS,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return CLIPTextModel(config)


def build_vae(sizes: Sizes = FULL):
    """64x64x3 <-> 32x32x4: one downsampling a step of `vae_channels` after the first, no
    attention (flat colours and one font do not need it)."""
    from diffusers import AutoencoderKL

    n = len(sizes.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=LATENT_CHANNELS,
        sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=sizes.vae_channels,
        layers_per_block=1,
        norm_num_groups=min(16, sizes.vae_channels[0]),
        mid_block_add_attention=False,
    )


def build_unet(sizes: Sizes = FULL):
    """A small UNet on 32x32x4 latents, halving to 4x4. The text reaches it twice: by
    cross-attention at every level below the first (16x16, 8x8, 4x4: a letter is about two cells
    at 16x16), and pooled into the time embedding (`addition_embed_type="text"`), which needs no
    extra pipeline inputs."""
    from diffusers import UNet2DConditionModel

    n = len(sizes.unet_channels)
    return UNet2DConditionModel(
        sample_size=64 // LATENT_FACTOR,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        layers_per_block=1,
        block_out_channels=sizes.unet_channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=sizes.text_hidden,
        attention_head_dim=sizes.unet_heads,  # diffusers reads this as the number of heads
        norm_num_groups=min(16, sizes.unet_channels[0]),
        addition_embed_type="text",
        addition_embed_type_num_heads=sizes.unet_heads,
    )


SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="linear",
    beta_start=0.0001,
    beta_end=0.02,
    prediction_type="v_prediction",
    timestep_spacing="trailing",
    steps_offset=1,
)
"""Linear betas end near zero signal, so the background colour cannot leak through the noise
at the last training step (it would be random at sampling time); v-prediction keeps the
noisiest steps learnable."""


def build_train_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER_CONFIG)


def build_sample_scheduler():
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(**SCHEDULER_CONFIG)


def assemble_pipeline(vae, text_encoder, tokenizer, unet):
    """A plain StableDiffusionPipeline around the parts, with the fast sampler."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_sample_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
