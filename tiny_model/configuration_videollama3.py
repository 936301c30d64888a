"""VideoLLaMA3 configuration, in the layout of the official checkpoints.

The official `config.json` is a flat Qwen2 config (the LLM's fields at top level) with three
VideoLLaMA3 fields and a nested `vision_encoder_config`. Both classes keep the official
`model_type`s and class names, so an official checkpoint folder loads unchanged; they are distinct
from transformers' native `video_llama_3` port, which therefore never shadows them.
"""

from transformers import Qwen2Config
from transformers.configuration_utils import PreTrainedConfig

# Every class a user reaches through an Auto class. `save_pretrained` writes only the entry of the
# object being saved (transformers' `custom_object_save`), so the whole map lives in the config.
AUTO_MAP = {
    "AutoConfig": "configuration_videollama3.Videollama3Qwen2Config",
    "AutoModel": "modeling_videollama3.Videollama3Qwen2ForCausalLM",
    "AutoModelForCausalLM": "modeling_videollama3.Videollama3Qwen2ForCausalLM",
    "AutoModelForImageTextToText": "modeling_videollama3.Videollama3Qwen2ForCausalLM",
    "AutoProcessor": "processing_videollama3.Videollama3Qwen2Processor",
    "AutoImageProcessor": "image_processing_videollama3.Videollama3ImageProcessor",
}


class Videollama3VisionEncoderConfig(PreTrainedConfig):
    """SigLIP-shaped vision encoder with 2D RoPE instead of absolute position embeddings.

    Defaults are the so400m shape of the official checkpoints (27 layers, width 1152, patch 14).
    """

    model_type = "videollama3_vision_encoder"
    base_config_key = "vision_encoder_config"
    # Tensor parallelism: heads split across ranks (q/k/v by column, out_proj by row: one all-reduce
    # per attention) and the MLP likewise; patch embedding and layer norms are small and replicated.
    base_model_tp_plan = {
        "encoder.layers.*.self_attn.q_proj": "colwise",
        "encoder.layers.*.self_attn.k_proj": "colwise",
        "encoder.layers.*.self_attn.v_proj": "colwise",
        "encoder.layers.*.self_attn.out_proj": "rowwise",
        "encoder.layers.*.mlp.fc1": "colwise",
        "encoder.layers.*.mlp.fc2": "rowwise",
    }
    # FSDP2 (`DistributedConfig(fsdp_size=N)`): one unit per encoder layer, gathered for its forward and freed
    # after; the patch embedding and post-layernorm are small and go with the root unit.
    base_model_fsdp_plan = {"encoder.layers.*": "free_full_weight"}

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    patch_size: int = 14
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    # Not in the official files: the encoder's 2D RoPE always used theta 10000.
    rope_theta: float = 10000.0
    initializer_range: float = 0.02


class Videollama3Qwen2Config(Qwen2Config):
    """Qwen2.5 LLM fields at top level plus the VideoLLaMA3 multimodal fields.

    Args (beyond `Qwen2Config`):
        vision_encoder_config: dict or `Videollama3VisionEncoderConfig` of the vision encoder.
        image_token_index: id of the `<image>` placeholder (151665 in the official tokenizer);
            images and video frames both use it, one run of placeholders per frame.
        mm_projector_type: only `"mlp2x_gelu"` (Linear, GELU, Linear) exists in the checkpoints.
        use_token_compression: whether the processor applies the Differential Frame Pruner to
            videos by default.
    """

    model_type = "videollama3_qwen2"
    sub_configs = {"vision_encoder_config": Videollama3VisionEncoderConfig}
    # Tensor parallelism: Qwen2's plan (inherited) for the LLM; the vision encoder's plan is on its
    # own config. The projector stays replicated: 0.2% of the 7B's weights, and plan names read
    # digits as `*`, so its official keys `readout.0` / `readout.2` cannot take different styles.

    vision_encoder_config: dict | PreTrainedConfig | None = None
    image_token_index: int = 151665
    mm_projector_type: str = "mlp2x_gelu"
    use_token_compression: bool = True
    auto_map: dict | None = None

    def __post_init__(self, **kwargs):
        if self.vision_encoder_config is None:
            self.vision_encoder_config = Videollama3VisionEncoderConfig()
        elif isinstance(self.vision_encoder_config, dict):
            self.vision_encoder_config = Videollama3VisionEncoderConfig(**self.vision_encoder_config)
        if self.mm_projector_type != "mlp2x_gelu":
            raise ValueError(
                f"mm_projector_type={self.mm_projector_type!r} is not supported: VideoLLaMA3 checkpoints "
                "use 'mlp2x_gelu'."
            )
        # Official checkpoints list only AutoConfig and AutoModelForCausalLM; fill in the rest.
        self.auto_map = {**AUTO_MAP, **(self.auto_map or {})}
        super().__post_init__(**kwargs)


__all__ = ["Videollama3VisionEncoderConfig", "Videollama3Qwen2Config"]
