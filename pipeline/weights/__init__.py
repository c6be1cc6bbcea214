"""Weights: a run's checkpoints as files (files.py, plain Python, read before torch is
imported), saving and loading them with DeepSpeed (checkpoint.py), the consolidated
export evaluation reads (export.py), the field's released weights in and out (interop.py),
and the command line (`python -m pipeline.weights export|import`)."""
