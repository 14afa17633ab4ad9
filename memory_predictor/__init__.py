"""Per-GPU memory, 4D layout search, throughput and time to train for megatron-core Llama training.

Pure functions from frozen dataclasses (``spec``) to frozen results; no torch, megatron or
hydra imports, so ``python -m memory_predictor`` answers in well under a second.

* ``memory.predict_memory``    breakdown of the first, a middle and the last stage, and the peak
* ``throughput.predict_step``  step time, tokens/s, TFLOP/s per GPU, MFU
* ``search.search``            every valid layout of a cluster that fits, ranked by throughput
* ``plan.make_plan``           ideal, planned and expected duration (``failures``), GPU-hours, cost, a
                               schedule of Slurm jobs and its milestones
* ``calibration``              a cluster's own efficiencies and overheads, fitted to its runs (``runs``)
* ``report`` / ``report_html`` the self-contained plan page
* ``cli``                      ``evaluate | search | plan | calibrate | report`` (docs/memory_predictor.md)

Every assumed or calibrated number lives in ``constants`` with its source.
"""

from memory_predictor.errors import PredictorError, Problem
from memory_predictor.memory import MemoryReport, StageMemory, predict_memory
from memory_predictor.plan import TrainingPlan, make_plan
from memory_predictor.search import Candidate, SearchResult, evaluate, search
from memory_predictor.spec import Hardware, Layout, ModelSpec, Options, TrainSpec, hardware
from memory_predictor.throughput import StepTime, predict_step

__all__ = ["PredictorError", "Problem", "MemoryReport", "StageMemory", "predict_memory", "TrainingPlan", "make_plan",
           "Candidate", "SearchResult", "evaluate", "search", "Hardware", "Layout", "ModelSpec", "Options",
           "TrainSpec", "hardware", "StepTime", "predict_step"]
