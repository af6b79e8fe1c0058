"""Running the app under uvicorn with a graceful SIGTERM.

SIGTERM stops admitting (new requests get 503), lets running requests finish for
`grace_s` seconds, cancels what is left and exits 0 (Ctrl-C does the same, then exits 130
like every slm command). uvicorn re-raises the signal it
caught after shutting down; the no-op handler installed first makes that re-raise end in
a normal exit instead of death by signal.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import uvicorn

from simplified_slm.serving.app import ServerConfig, create_app
from simplified_slm.tokenizers.chat_template import ChatTemplate


def model_name(path: str | Path) -> str:
    """A readable id for /v1/models: the folder name, with the run's name for a checkpoint."""
    folder = Path(path).resolve()
    if folder.is_file():
        folder = folder.parent
    if folder.parent.name == "checkpoints":
        return f"{folder.parent.parent.name}/{folder.name}"
    return folder.name

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: Any) -> None:
        super().__init__(config)
        self.slm_app = app

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.slm_app.state.scheduler.drain()
        super().handle_exit(sig, frame)


def serve(model: Any, tokenizer: Any, config: ServerConfig, host: str, port: int, grace_s: float) -> None:
    chat = ChatTemplate.for_tokenizer(tokenizer)
    app = create_app(model, tokenizer, config, chat)
    server = _Server(uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=grace_s,
                                    log_level="info", access_log=False), app)
    print(f"serving {config.model_name} ({chat.kind} chat format) on http://{host}:{port}", flush=True)
    if host not in LOOPBACK and config.api_key is None:
        print(f"warning: {host} is reachable from other machines and no --api-key is set; anyone who can "
              "reach it can use the model (docs/SERVING.md: behind a reverse proxy)", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
