"""Distributed training pieces beyond :mod:`spectra.parallel`: mesh-independent checkpoints."""

from .checkpoint import (
    full_model_state,
    full_optimizer_state,
    gather_model,
    load_model_state,
    load_optimizer_state,
    load_training_checkpoint,
    save_training_checkpoint,
)

__all__ = ["full_model_state", "full_optimizer_state", "gather_model", "load_model_state", "load_optimizer_state",
           "load_training_checkpoint", "save_training_checkpoint"]
