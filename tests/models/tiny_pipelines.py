"""Tiny random-weight pipelines of every family Kiln serves, built from configs (as diffusers' own
tests build theirs) and saved with `save_pretrained`; no hub, no downloaded tokenizer.

Each keeps its family's real latent channels and VAE scaling factors (so previews take the path a
real checkpoint takes) and is small enough to draw a 32×32 image in milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

WORDS = (
    "a an the of and on in with by to is at red green blue yellow purple orange white black grey pink brown "
    "circle square triangle star cat dog monkey house tree sky sea sun moon painting photo picture image "
    "system user assistant describe detailing color shape size texture quantity text spatial relationships "
    "objects background given prompt generate enhanced you are designed superior images degree alignment "
    "based textual prompts start make it repaint this"
).split()
SPECIALS = ("<pad>", "</s>", "<unk>", "<s>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>",
            "<start_of_turn>", "<end_of_turn>", "<Prompt", "Start>")
VOCAB = 320
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tokenizer(max_length: int = 77) -> Any:
    """A word-level tokenizer (unknown words → <unk>) in transformers' fast-tokenizer class."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(dict.fromkeys([*SPECIALS, *WORDS, *".,:;!?'\"-()", " ", "\n"]))}
    assert len(vocab) < VOCAB
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # words, punctuation and each whitespace character are tokens (a prompt of " " is one token, as with
    # the real BPE tokenizers Qwen-Image's negative prompt relies on)
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]+|\s"), behavior="isolated")
    # <s> … </s> around every text, so an empty prompt is two tokens (CogView4 pads what it gets to 16)
    core.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> $B </s>",
                                                        special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                  bos_token="<s>", model_max_length=max_length)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _clip(projection: bool = False, hidden: int = 32) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(bos_token_id=3, eos_token_id=1, pad_token_id=0, hidden_size=hidden, intermediate_size=37,
                            num_attention_heads=4, num_hidden_layers=2, vocab_size=VOCAB, hidden_act="gelu",
                            projection_dim=32)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _t5(d_model: int = 32) -> Any:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=VOCAB, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0,
                                   eos_token_id=1))


def _qwen3(layers: int = 2, causal: bool = False) -> Any:
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    config = Qwen3Config(hidden_size=16, intermediate_size=16, num_hidden_layers=layers, num_attention_heads=2,
                         num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, max_position_embeddings=1024)
    return (Qwen3ForCausalLM if causal else Qwen3Model)(config)


def _gemma2(hidden: int = 8, layers: int = 1) -> Any:
    from transformers import Gemma2Config, Gemma2Model

    return Gemma2Model(Gemma2Config(head_dim=4, hidden_size=hidden, intermediate_size=16, num_attention_heads=2,
                                    num_hidden_layers=layers, num_key_value_heads=2, vocab_size=VOCAB,
                                    max_position_embeddings=4096, sliding_window=64, pad_token_id=0, eos_token_id=1,
                                    bos_token_id=3))


def _vae_kl(latent_channels: int, scaling: float, shift: float | None = None, levels: int = 2) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * levels,
                         up_block_types=["UpDecoderBlock2D"] * levels, block_out_channels=[8] * levels,
                         layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4, sample_size=32,
                         scaling_factor=scaling, shift_factor=shift)


def _unet(sdxl: bool = False) -> Any:
    from diffusers import UNet2DConditionModel

    extra: dict[str, Any] = {}
    if sdxl:
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=80, use_linear_projection=True)
    return UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=4, **extra)


def sd() -> dict[str, Any]:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    return dict(cls=StableDiffusionPipeline, unet=_unet(), vae=_vae_kl(4, 0.18215), text_encoder=_clip(),
                tokenizer=tokenizer(), scheduler=DDIMScheduler(steps_offset=1), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)


def sd2() -> dict[str, Any]:
    """SD 2.x: the same pipeline with a v-prediction scheduler."""
    from diffusers import EulerDiscreteScheduler

    return {**sd(), "scheduler": EulerDiscreteScheduler(prediction_type="v_prediction")}


def sdxl() -> dict[str, Any]:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    return dict(cls=StableDiffusionXLPipeline, unet=_unet(sdxl=True), vae=_vae_kl(4, 0.13025),
                text_encoder=_clip(hidden=16), text_encoder_2=_clip(projection=True, hidden=16),
                tokenizer=tokenizer(), tokenizer_2=tokenizer(), scheduler=EulerDiscreteScheduler(),
                image_encoder=None, feature_extractor=None)


def sd3() -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
                                        joint_attention_dim=32, pooled_projection_dim=64)
    return dict(cls=StableDiffusion3Pipeline, transformer=transformer, vae=_vae_kl(16, 1.5305, 0.0609),
                text_encoder=_clip(projection=True), text_encoder_2=_clip(projection=True), text_encoder_3=_t5(),
                tokenizer=tokenizer(), tokenizer_2=tokenizer(), tokenizer_3=tokenizer(256),
                scheduler=FlowMatchEulerDiscreteScheduler(), image_encoder=None, feature_extractor=None)


def flux() -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True)
    return dict(cls=FluxPipeline, transformer=transformer, vae=_vae_kl(16, 0.3611, 0.1159),
                text_encoder=_clip(), text_encoder_2=_t5(), tokenizer=tokenizer(), tokenizer_2=tokenizer(512),
                scheduler=FlowMatchEulerDiscreteScheduler(), image_encoder=None, feature_extractor=None)


def flux2() -> dict[str, Any]:
    """FLUX.2 [klein] (a Qwen3 text encoder); distilled, as the released 4B/9B are."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )

    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=128, num_layers=1, num_single_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                          timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4],
                                          guidance_embeds=False)
    vae = AutoencoderKLFlux2(sample_size=32, down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                             latent_channels=32, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False)
    # three of its hidden layers are stacked (layers 9, 18, 27), so the tiny encoder keeps 28 of them
    return dict(cls=Flux2KleinPipeline, transformer=transformer, vae=vae, text_encoder=_qwen3(28, causal=True),
                tokenizer=tokenizer(512), scheduler=FlowMatchEulerDiscreteScheduler(), is_distilled=True)


def qwen_image() -> dict[str, Any]:
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=1,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                              guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True])
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "vocab_size": VOCAB,
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                     "rope_theta": 1000000.0},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16, vocab_size=VOCAB, vision_end_token_id=VOCAB - 3, vision_start_token_id=VOCAB - 2,
        vision_token_id=VOCAB - 1, image_token_id=VOCAB - 4, video_token_id=VOCAB - 5,
    )
    return dict(cls=QwenImagePipeline, transformer=transformer, vae=vae,
                text_encoder=Qwen2_5_VLForConditionalGeneration(config).eval(), tokenizer=tokenizer(1024),
                scheduler=FlowMatchEulerDiscreteScheduler())


def z_image() -> dict[str, Any]:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32,
                                           n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
                                           axes_dims=[8, 4, 4], axes_lens=[256, 32, 32])
    with torch.no_grad():  # allocated with torch.empty
        transformer.x_pad_token.copy_(torch.ones_like(transformer.x_pad_token))
        transformer.cap_pad_token.copy_(torch.ones_like(transformer.cap_pad_token))
    return dict(cls=ZImagePipeline, transformer=transformer, vae=_vae_kl(16, 0.3611, 0.1159),
                text_encoder=_qwen3(), tokenizer=tokenizer(512), scheduler=FlowMatchEulerDiscreteScheduler())


def sana() -> dict[str, Any]:
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel

    transformer = SanaTransformer2DModel(patch_size=1, in_channels=32, out_channels=32, num_layers=1,
                                         num_attention_heads=2, attention_head_dim=4, num_cross_attention_heads=2,
                                         cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
                                         sample_size=16)
    vae = AutoencoderDC(in_channels=3, latent_channels=32, attention_head_dim=2,
                        encoder_block_types=("ResBlock", "EfficientViTBlock"),
                        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(16, 32),
                        decoder_block_out_channels=(16, 32), encoder_qkv_multiscales=((), (5,)),
                        decoder_qkv_multiscales=((), (5,)), encoder_layers_per_block=(1, 1),
                        decoder_layers_per_block=[1, 1], downsample_block_type="conv",
                        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                        scaling_factor=0.41407)
    return dict(cls=SanaPipeline, transformer=transformer, vae=vae, text_encoder=_gemma2(),
                tokenizer=tokenizer(2048), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def pixart_sigma() -> dict[str, Any]:
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    transformer = PixArtTransformer2DModel(sample_size=16, num_layers=1, patch_size=2, attention_head_dim=8,
                                           num_attention_heads=2, caption_channels=32, in_channels=4,
                                           cross_attention_dim=16, out_channels=8, attention_bias=True,
                                           activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                           norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    return dict(cls=PixArtSigmaPipeline, transformer=transformer.eval(), vae=_vae_kl(4, 0.13025), text_encoder=_t5(),
                tokenizer=tokenizer(300), scheduler=DPMSolverMultistepScheduler())


def lumina2() -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel

    transformer = Lumina2Transformer2DModel(sample_size=4, patch_size=2, in_channels=16, hidden_size=16, num_layers=1,
                                            num_refiner_layers=1, num_attention_heads=1, num_kv_heads=1,
                                            multiple_of=16, axes_dim_rope=[8, 4, 4], cap_feat_dim=8)
    # Lumina 2 hard-codes a VAE scale of 8: four levels
    return dict(cls=Lumina2Pipeline, transformer=transformer, vae=_vae_kl(16, 0.3611, 0.1159, levels=4),
                text_encoder=_gemma2(layers=2), tokenizer=tokenizer(512), scheduler=FlowMatchEulerDiscreteScheduler())


def chroma() -> dict[str, Any]:
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    transformer = ChromaTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                           attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                           axes_dims_rope=[4, 4, 8], approximator_hidden_dim=32,
                                           approximator_layers=1, approximator_num_channels=16)
    return dict(cls=ChromaPipeline, transformer=transformer, vae=_vae_kl(16, 0.3611, 0.1159),
                text_encoder=_t5().eval(), tokenizer=tokenizer(512), scheduler=FlowMatchEulerDiscreteScheduler(),
                image_encoder=None, feature_extractor=None)


def sana_sprint() -> dict[str, Any]:
    from diffusers import SanaSprintPipeline, SCMScheduler

    parts = sana()
    from diffusers import SanaTransformer2DModel

    parts["transformer"] = SanaTransformer2DModel(
        patch_size=1, in_channels=32, out_channels=32, num_layers=1, num_attention_heads=2, attention_head_dim=4,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
        sample_size=16, qk_norm="rms_norm_across_heads", guidance_embeds=True)
    return {**parts, "cls": SanaSprintPipeline, "scheduler": SCMScheduler()}


def cogview4() -> dict[str, Any]:
    from diffusers import CogView4Pipeline, CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import GlmConfig, GlmModel

    transformer = CogView4Transformer2DModel(patch_size=2, in_channels=16, num_layers=1, attention_head_dim=4,
                                             num_attention_heads=4, out_channels=16, text_embed_dim=32,
                                             time_embed_dim=8, condition_dim=4, sample_size=16)
    encoder = GlmModel(GlmConfig(hidden_size=32, intermediate_size=8, num_hidden_layers=2, num_attention_heads=4,
                                 head_dim=8, vocab_size=VOCAB, pad_token_id=0))
    scheduler = FlowMatchEulerDiscreteScheduler(base_shift=0.25, max_shift=0.75, base_image_seq_len=256,
                                                use_dynamic_shifting=True, time_shift_type="linear")
    return dict(cls=CogView4Pipeline, transformer=transformer, vae=_vae_kl(16, 1.0), text_encoder=encoder,
                tokenizer=tokenizer(1024), scheduler=scheduler)


BUILDERS: dict[str, Callable[[], dict[str, Any]]] = {
    "sd": sd, "sd2": sd2, "sdxl": sdxl, "sd3": sd3, "flux": flux, "flux2": flux2, "qwen-image": qwen_image,
    "z-image": z_image, "sana": sana, "pixart-sigma": pixart_sigma, "lumina2": lumina2, "chroma": chroma,
    "sana-sprint": sana_sprint, "cogview4": cogview4,
}
NATIVE_OVERRIDE = {"flux": 32, "flux2": 32, "qwen-image": 32, "z-image": 32, "chroma": 32}
"""Families whose pipelines hard-code a 1024-ish default: the tiny ones are served at 32 instead."""


def build(name: str, root: Path) -> Path:
    """Build the tiny `name` pipeline once into `root/name` (save_pretrained) and return its path."""
    import torch

    path = root / name
    if (path / "model_index.json").is_file():
        return path
    torch.manual_seed(0)
    parts = BUILDERS[name]()
    cls = parts.pop("cls")
    pipe = cls(**parts)
    pipe.save_pretrained(path)
    return path
