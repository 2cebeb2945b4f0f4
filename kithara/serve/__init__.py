"""An OpenAI-compatible server for kithara models: ``kithara serve MODEL_DIR`` (docs/serve.md).

``config`` (``ServeConfig``), ``loading`` (the model, from a directory or a training
checkpoint), ``engine`` (batched generation in a worker thread), ``protocol`` (request bodies
and OpenAI errors), ``text`` (stop strings, finish reasons), ``streaming`` (segmented
generation, server-sent events), ``app`` (the FastAPI app) and ``server`` (``serve``).
"""

from kithara.serve.config import ServeConfig
from kithara.serve.engine import Engine, Sampling
from kithara.serve.loading import ServedModel, load_served_model
from kithara.serve.server import serve

__all__ = ["Engine", "Sampling", "ServeConfig", "ServedModel", "load_served_model", "serve"]
