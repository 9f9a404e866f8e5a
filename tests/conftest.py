"""Session-wide test setup, loaded before any test module.

Triton's CPU interpreter must be chosen before triton is first imported anywhere in the process:
test modules that import transformers or torch's compiler stack pull triton in early, and kernels
built by an interpreter-less triton cannot run in the interpreter later. The Hopper compile checks
run in a subprocess without this variable (tests/kernels/test_feedback_triton_sm90.py).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
