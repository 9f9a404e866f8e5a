"""ModelConfig: every hyper-parameter of the model the recipe trains: Sessa (SESSA.md §1-3) or the
Transformer++ baseline (`arch`). `SessaConfig` is the old name, kept as an alias for one release."""
from dataclasses import asdict, dataclass, fields

from kernels.feedback_solve import FEEDBACK_IMPLS

BLOCK_TYPES = {"S": "Sessa block", "*": "attention block", "-": "SwiGLU MLP block", "M": "Mamba-2 block"}  # model/blocks.py
ARCHS = ("sessa", "transformer")  # "transformer": the Transformer++ baseline of model/transformer.py
INIT_SCHEMES = ("reference", "scaled")
DTYPES = ("float32", "bfloat16", "float16")
ROPE_SCALING_TYPES = ("linear", "yarn")  # model.rope_scaling.rope_type; `none` is rope_scaling: none


@dataclass(kw_only=True)
class RopeScaling:
    """model.rope_scaling: RoPE context extension by `factor` s (docs/model.md "RoPE base and scaling");
    the names are Hugging Face's. "linear": position interpolation, positions / s. "yarn": YaRN as
    published (Peng et al. 2023): NTK-by-parts frequencies, ramped on r = L / wavelength between
    beta_slow and beta_fast, and q, k scaled by 0.1 ln s + 1."""
    rope_type: str
    factor: float  # s = the new context length / original_max_position_embeddings
    original_max_position_embeddings: int | None = None  # L, the length trained before the extension (yarn)
    beta_fast: float = 32.0  # yarn: dimensions turning more than beta_fast times over L keep their frequency
    beta_slow: float = 1.0  # yarn: dimensions turning fewer than beta_slow times are interpolated by s

    def __post_init__(self):
        if self.rope_type not in ROPE_SCALING_TYPES:
            raise ValueError(f"model.rope_scaling.rope_type must be one of {ROPE_SCALING_TYPES} (or rope_scaling: "
                             f"none), got {self.rope_type!r}")
        if isinstance(self.factor, bool) or not isinstance(self.factor, int | float) or not self.factor > 1:
            raise ValueError(f"model.rope_scaling.factor must be a number > 1 (the context extension; "
                             f"rope_scaling: none for no scaling), got {self.factor!r}")
        if self.rope_type == "yarn":
            length = self.original_max_position_embeddings
            if isinstance(length, bool) or not isinstance(length, int) or length < 1:
                raise ValueError("model.rope_scaling.original_max_position_embeddings must be a positive integer "
                                 f"for yarn (the sequence length trained before the extension), got {length!r}")
            if not 0 < self.beta_slow < self.beta_fast:
                raise ValueError(f"model.rope_scaling: yarn needs 0 < beta_slow < beta_fast, got beta_slow "
                                 f"{self.beta_slow!r} and beta_fast {self.beta_fast!r}")
        elif self.original_max_position_embeddings is not None:
            raise ValueError("model.rope_scaling.original_max_position_embeddings is for rope_type yarn; linear "
                             "divides every position by the factor")


@dataclass(kw_only=True)
class ModelConfig:
    arch: str = "sessa"  # "transformer": the same width/depth/heads as a Transformer++ (scaling comparisons)
    layer_pattern: str = ""  # one BLOCK_TYPES character per block (model/blocks.py); "" = "S" * num_layers
    ffn_hidden_size: int | None = None  # transformer and `-` blocks: SwiGLU width; None = 8/3 * hidden_size up to a multiple of 64
    vocab_size: int
    hidden_size: int  # D, the model width
    num_layers: int
    num_heads: int  # forward-branch heads H; head size d = D / H
    num_kv_heads: int | None = None  # grouped-query attention; None means num_heads
    gamma_max: float = 0.999  # |gamma| <= gamma_max < 1 keeps the feedback solve stable
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    rope_scaling: RopeScaling | None = None  # context extension (RopeScaling); None or "none": plain RoPE
    tie_embeddings: bool = True
    init_scheme: str = "scaled"  # "reference": PyTorch defaults as the public reference; "scaled": normal(init_std)
    init_std: float = 0.02
    # μP (model/mup.py, docs/mup.md): hyper-parameters tuned at width mup_base_width hold at hidden_size
    mup: bool = False
    mup_base_width: int | None = None  # D0, the width the learning rate and init_std were tuned at
    mup_base_head_size: int | None = None  # d0 of the forward attention; None = mup_base_width / num_heads
    feedback: bool = True  # false: the paper's ablation without the feedback branch (s = f; no fb_* parameters)
    feedback_impl: str = "auto"  # "auto" = triton on CUDA, chunked elsewhere; "dense" is the O(T^2) oracle
    feedback_chunk_size: int = 64
    # `M` blocks (model/mamba.py): state size N, head size P, inner width mamba_expand * hidden_size,
    # depthwise causal conv kernel, SSD chunk (kernels/ssd/chunk.py)
    mamba_state_size: int = 128
    mamba_head_size: int = 64
    mamba_expand: int = 2
    mamba_conv_kernel: int = 4
    mamba_chunk_size: int = 64
    dtype: str = "float32"  # parameter dtype
    vocab_pad_multiple: int = 64  # embedding rows padded up so the vocabulary shards evenly

    def __post_init__(self):
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.arch not in ARCHS:
            raise ValueError(f"ModelConfig.arch must be one of {ARCHS}, got {self.arch!r}")
        self._check_layer_pattern()
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = -(-(8 * self.hidden_size // 3) // 64) * 64  # LLaMA's rule
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size",
                     "feedback_chunk_size", "vocab_pad_multiple", "mamba_state_size", "mamba_head_size",
                     "mamba_expand", "mamba_conv_kernel", "mamba_chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"ModelConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.head_size % 2:
            raise ValueError(
                f"ModelConfig: head size hidden_size/num_heads = {self.head_size} must be even for RoPE pairs; "
                "change hidden_size or num_heads"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})"
            )
        if not 0.0 < self.gamma_max < 1.0:
            raise ValueError(f"ModelConfig.gamma_max must lie in (0, 1) for a stable solve, got {self.gamma_max}")
        if self.norm_eps <= 0:
            raise ValueError(f"ModelConfig.norm_eps must be > 0, got {self.norm_eps}")
        if self.rope_base <= 1:
            raise ValueError(f"ModelConfig.rope_base must be > 1, got {self.rope_base}")
        self._check_rope_scaling()
        if self.init_scheme not in INIT_SCHEMES:
            raise ValueError(f"ModelConfig.init_scheme must be one of {INIT_SCHEMES}, got {self.init_scheme!r}")
        if self.init_std <= 0:
            raise ValueError(f"ModelConfig.init_std must be > 0, got {self.init_std}")
        self._check_mup()
        if self.feedback_impl not in FEEDBACK_IMPLS:
            raise ValueError(f"ModelConfig.feedback_impl must be one of {FEEDBACK_IMPLS}, got {self.feedback_impl!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"ModelConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")

    def _check_mup(self) -> None:
        if not isinstance(self.mup, bool):
            raise ValueError(f"model.mup must be true or false, got {self.mup!r}")
        if not self.mup:
            if self.mup_base_width is not None or self.mup_base_head_size is not None:
                raise ValueError("model.mup_base_width / mup_base_head_size are set but model.mup is false; set "
                                 "model.mup: true, or remove them")
            return
        if self.arch != "sessa":
            raise ValueError(f"model.mup is for model.arch 'sessa' (got {self.arch!r}); the Transformer arm under "
                             "μP is model.layer_pattern '*-' * num_layers with arch 'sessa'")
        if self.init_scheme != "scaled":
            raise ValueError(f"model.mup needs model.init_scheme 'scaled' (got {self.init_scheme!r}): μP rescales "
                             "its normal(init_std) draws")
        base = self.mup_base_width
        if isinstance(base, bool) or not isinstance(base, int) or base < 1:
            raise ValueError("model.mup: true needs model.mup_base_width, the width (hidden_size) the learning rate "
                             f"and init_std were tuned at, as a positive integer; got {base!r}")
        if self.mup_base_head_size is None:
            if base % self.num_heads:
                raise ValueError(f"model.mup_base_width ({base}) is not divisible by num_heads ({self.num_heads}); "
                                 "set model.mup_base_head_size (the base model's attention head size)")
            self.mup_base_head_size = base // self.num_heads
        head = self.mup_base_head_size
        if isinstance(head, bool) or not isinstance(head, int) or head < 1:
            raise ValueError(f"model.mup_base_head_size must be a positive integer, got {head!r}")

    def _check_rope_scaling(self) -> None:
        """rope_scaling as written in a recipe or a saved config: none, or a mapping of RopeScaling's fields."""
        scaling = self.rope_scaling
        if scaling is None or (isinstance(scaling, str) and scaling.lower() == "none"):
            self.rope_scaling = None
        elif isinstance(scaling, dict):
            names = {f.name for f in fields(RopeScaling)}
            unknown = sorted(set(scaling) - names)
            if unknown or "rope_type" not in scaling or "factor" not in scaling:
                raise ValueError(f"model.rope_scaling needs rope_type and factor (fields: {', '.join(sorted(names))}); "
                                 f"got {scaling!r}")
            self.rope_scaling = RopeScaling(**scaling)
        elif not isinstance(scaling, RopeScaling):
            raise ValueError("model.rope_scaling must be none or a mapping {rope_type: linear | yarn, factor: ..., "
                             f"original_max_position_embeddings: ...}}, got {scaling!r}")

    def _check_layer_pattern(self) -> None:
        pattern = self.layer_pattern
        if not isinstance(pattern, str):
            raise ValueError(f"ModelConfig.layer_pattern must be a string of block characters, got {pattern!r}")
        if not pattern:
            return
        unknown = sorted(set(pattern) - set(BLOCK_TYPES))
        if unknown:
            valid = ", ".join(f"{c!r} ({name})" for c, name in BLOCK_TYPES.items())
            raise ValueError(f"model.layer_pattern {pattern!r} has unknown block character(s) {unknown}; "
                             f"valid ones: {valid}")
        if self.arch != "sessa":
            raise ValueError(f"model.layer_pattern is for model.arch 'sessa' (got arch {self.arch!r}); the "
                             "Transformer arm is the pattern '*-' * num_layers under arch 'sessa'")
        if self.num_layers != len(pattern):
            raise ValueError(f"model.num_layers ({self.num_layers}) must equal the length of model.layer_pattern "
                             f"{pattern!r} ({len(pattern)}): one block per character")
        if "-" in pattern and (not isinstance(self.ffn_hidden_size, int | None) or
                               (self.ffn_hidden_size is not None and self.ffn_hidden_size < 1)):
            raise ValueError(f"model.layer_pattern {pattern!r} has MLP blocks ('-') but model.ffn_hidden_size "
                             f"({self.ffn_hidden_size!r}) is not a positive integer; set it, or leave it unset "
                             "for 8/3 * hidden_size rounded up to a multiple of 64")
        if "M" in pattern and isinstance(self.mamba_expand, int) and isinstance(self.mamba_head_size, int) \
                and self.mamba_head_size > 0 and self.mamba_expand * self.hidden_size % self.mamba_head_size:
            raise ValueError(f"model.layer_pattern {pattern!r} has Mamba-2 blocks ('M') but their inner width "
                             f"mamba_expand * hidden_size = {self.mamba_expand * self.hidden_size} is not a multiple "
                             f"of model.mamba_head_size ({self.mamba_head_size}); change either")

    @property
    def block_types(self) -> str:
        """One character per block: the layer pattern, or "S" * num_layers when it is empty."""
        return self.layer_pattern or "S" * self.num_layers

    @property
    def mamba_inner_size(self) -> int:
        """Width of an `M` block's x, z and output (its heads times mamba_head_size)."""
        return self.mamba_expand * self.hidden_size

    @property
    def mamba_heads(self) -> int:
        return self.mamba_inner_size // self.mamba_head_size

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def padded_vocab_size(self) -> int:
        multiple = self.vocab_pad_multiple
        return -(-self.vocab_size // multiple) * multiple

    def to_dict(self) -> dict:
        return asdict(self)

    def check_tensor_parallel(self, tp_size: int) -> None:
        """Heads and kv-heads are sharded across tensor-parallel ranks (SESSA.md §6)."""
        names = ("num_heads", "num_kv_heads", "hidden_size") + (("ffn_hidden_size",) if "-" in self.layer_pattern else ())
        names += ("mamba_heads", "mamba_state_size") if "M" in self.layer_pattern else ()  # heads; B/C rows
        derived = {"mamba_heads": "mamba_heads = mamba_expand * hidden_size / mamba_head_size"}
        for name in names:
            if getattr(self, name) % tp_size:
                raise ValueError(
                    f"ModelConfig.{derived.get(name, name)} ({getattr(self, name)}) must be divisible by the "
                    f"tensor-parallel size ({tp_size})"
                )
        if self.padded_vocab_size % tp_size:
            raise ValueError(
                f"ModelConfig.vocab_pad_multiple ({self.vocab_pad_multiple}) must be a multiple of the "
                f"tensor-parallel size ({tp_size})"
            )


SessaConfig = ModelConfig  # the old name; removed in the next release
