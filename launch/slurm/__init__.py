"""SLURM launching: `python -m launch.slurm` submits launch/slurm/pretrain.sbatch (see __main__.py)."""
