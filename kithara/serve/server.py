"""``serve``: load a model and answer OpenAI API requests for it over HTTP (uvicorn)."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from kithara.serve.config import ServeConfig

logger = logging.getLogger(__name__)


def serve(config: ServeConfig | str, **settings: Any) -> None:
    """Serves a model until interrupted (Ctrl-C or SIGTERM): loads it, then runs uvicorn.

    Args:
        config: a ``ServeConfig``, or the model directory (then ``settings`` are the other
            ``ServeConfig`` fields).
        settings: ``ServeConfig`` fields, overriding ``config``'s.

    Example:
        >>> serve("runs/exp1/hf", model_name="exp1", port=8000)  # then: openai.OpenAI(base_url=
        ...                                                       # "http://127.0.0.1:8000/v1", api_key="x")
    """
    try:
        import uvicorn

        from kithara.serve.app import create_app
    except ImportError as error:
        raise ImportError(
            f"kithara serve needs the serve extra ({error.name} is missing): pip install 'kithara[serve]'."
        ) from error
    from kithara.serve.engine import Engine
    from kithara.serve.loading import load_served_model

    if isinstance(config, str):
        config = ServeConfig(config, **settings)
    elif settings:
        config = dataclasses.replace(config, **settings)
    served = load_served_model(config)
    logger.info(
        "Serving %r (%s) on http://%s:%d/v1, max_model_len %d, max_batch_size %d, stop token ids %s.",
        served.name,
        served.source,
        config.host,
        config.port,
        served.max_model_len,
        config.max_batch_size,
        served.stop_token_ids,
    )
    engine = Engine(served, max_batch_size=config.max_batch_size, batch_wait_s=config.batch_wait_ms / 1000)
    app = create_app(
        engine,
        default_max_tokens=config.default_max_tokens,
        stream_segment_tokens=config.stream_segment_tokens,
        log_requests=config.log_requests,
    )
    # log_config=None: uvicorn's records go through the logging set up by the caller (the CLI).
    uvicorn.run(app, host=config.host, port=config.port, log_config=None, access_log=config.log_requests)
