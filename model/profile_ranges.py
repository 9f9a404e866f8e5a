"""Names of the `torch.profiler.record_function` ranges a profiled step shows (`profile.steps`,
pretrain/profiling.py): the model's parts, marked where the model calls them, and the training
step's phases, marked by pretrain/. Outside a profiled step a range costs a few microseconds."""

FORWARD_ATTENTION = "forward_attention"  # softmax attention of `S` and `*` blocks (not its projections)
FEEDBACK_SOLVE = "feedback_solve"  # the feedback solve of `S` blocks, with its q_b/k_b/gamma inputs
MLP = "mlp"  # the SwiGLU of `-` blocks
MAMBA_SCAN = "mamba_scan"  # the SSD scan of `M` blocks
OPTIMIZER_STEP = "optimizer_step"  # clipping and the parameter update
GRADIENT_REDUCTION = "gradient_reduction"  # the data-parallel gradient all-reduce / reduce-scatter
DATA_WAIT = "data_wait"  # the loop waiting for the data loader's next micro-batch
