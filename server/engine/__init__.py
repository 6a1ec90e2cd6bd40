"""The batching engine: a torch-free scheduler and loop, and model runners (the only code touching tensors).

Importing this package does not import torch; the runners' modules are imported when models load.
"""

from streamplex.server.engine.batch import BatchRunner, Job, StepFailed
from streamplex.server.engine.engine import Engine, EngineError, Limits, Stream, Update
from streamplex.server.engine.factory import build_engine
from streamplex.server.engine.request import GenerationRequest, SamplingParams

__all__ = ["BatchRunner", "Engine", "EngineError", "GenerationRequest", "Job", "Limits", "SamplingParams", "StepFailed", "Stream", "Update", "build_engine"]
