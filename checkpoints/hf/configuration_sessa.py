"""Hugging Face configuration of a Sessa language model (arXiv 2604.18580).

Self-contained: copied next to the weights of an export, loaded with `trust_remote_code=True`.
"""
from transformers import PretrainedConfig


class ModelConfig(PretrainedConfig):
    model_type = "sessa"

    def __init__(self, vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=None, gamma_max=0.999, layer_norm_eps=1e-5, rope_theta=10000.0,
                 feedback_chunk_size=64, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
                 pad_token_id=None, layer_pattern="", intermediate_size=None, mamba_state_size=128,
                 mamba_head_size=64, mamba_expand=2, mamba_conv_kernel=4, mamba_chunk_size=64,
                 sessa_rope_scaling=None, query_multiplier=1.0, feedback_query_multiplier=1.0,
                 logits_multiplier=1.0, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.gamma_max = gamma_max
        self.layer_norm_eps = layer_norm_eps
        self.rope_theta = rope_theta
        # None, {"rope_type": "linear", "factor": s} or {"rope_type": "yarn", "factor": s,
        # "original_max_position_embeddings": L, "beta_fast": 32.0, "beta_slow": 1.0} (modeling_sessa.py).
        # Not `rope_scaling`: transformers reads that key as its own RoPE types (its yarn ramps over rounded
        # dimension indices, not as published) and fails to load a remote-code config.json holding a yarn one.
        self.sessa_rope_scaling = sessa_rope_scaling
        self.feedback_chunk_size = feedback_chunk_size
        # μP's forward multipliers as trained (model/mup.py; 1.0 without μP): the forward-branch and `*`
        # queries, the feedback branch's q_b, and the LM head's input
        self.query_multiplier = query_multiplier
        self.feedback_query_multiplier = feedback_query_multiplier
        self.logits_multiplier = logits_multiplier
        self.layer_pattern = layer_pattern  # "S" Sessa, "*" attention, "-" SwiGLU MLP, "M" Mamba-2; "" = all Sessa
        self.intermediate_size = intermediate_size  # the MLP blocks' width
        # Mamba-2 blocks: state size N, head size P, inner width mamba_expand * hidden_size, conv kernel, SSD chunk
        self.mamba_state_size = mamba_state_size
        self.mamba_head_size = mamba_head_size
        self.mamba_expand = mamba_expand
        self.mamba_conv_kernel = mamba_conv_kernel
        self.mamba_chunk_size = mamba_chunk_size
        super().__init__(tie_word_embeddings=tie_word_embeddings, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)
