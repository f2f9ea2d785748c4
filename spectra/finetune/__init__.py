"""Fine-tuning: supervised fine-tuning on packed examples, float -> ternary conversion, LoRA on a packed base.

All three run through the pretraining loop (spectra.train.loop.train) with their own dataset and objective;
docs/finetuning.md has the formats, the commands and measured results.
"""

from .convert import DistillationLoss, PhasedTernaryLinear, distillation_loss, phase_at, phase_in, set_phase
from .data import IGNORE, TEMPLATE, ChatFormat, FinetuneDataset, PackedLoader, pack_examples, read_examples
from .run import FinetuneConfig, FinetuneResult, finetune

__all__ = ["DistillationLoss", "PhasedTernaryLinear", "distillation_loss", "phase_at", "phase_in", "set_phase",
           "IGNORE", "TEMPLATE", "ChatFormat", "FinetuneDataset", "PackedLoader", "pack_examples", "read_examples",
           "FinetuneConfig", "FinetuneResult", "finetune"]
