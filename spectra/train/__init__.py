"""Pretraining: the loop (`train`, `Trainer`), the pieces of a step, its configuration, the Spectra TriLM schedule,
the run directory and resumable state.

The package itself is callable: ``spectra.train(...)`` is :func:`spectra.train.loop.train`. A plain function
re-exported as ``spectra.train`` would shadow this package, and ``import spectra.train.loop`` (or
``mock.patch("spectra.train.loop...")``) would then fail; a callable module keeps both working.
"""

import sys
import types

from .config import DEFAULT_LR, TrainConfig
from .loop import Trainer, TrainResult, is_main_process, train
from .memory import StepMemory, estimate_step_memory
from .rundir import read_metrics
from .schedule import Schedule, SchedulePhase, spectra_phases
from .state import list_checkpoints, load_training_state, resolve_resume, save_training_state
from .step import Objective, build_loaders, build_model, build_optimizer, evaluate, train_step

__all__ = ["DEFAULT_LR", "Objective", "TrainConfig", "TrainResult", "Trainer", "build_loaders", "build_model",
           "build_optimizer", "evaluate", "is_main_process", "read_metrics", "train", "train_step", "Schedule",
           "SchedulePhase", "spectra_phases", "list_checkpoints", "load_training_state", "resolve_resume",
           "save_training_state", "StepMemory", "estimate_step_memory"]


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs) -> TrainResult:
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
