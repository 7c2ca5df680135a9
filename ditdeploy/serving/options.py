"""``ditdeploy serve``'s settings: what the command hands the server process (as JSON).

Stdlib only (the CLI imports it to build ``--help``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ditdeploy.errors import DitDeployError

DEFAULT_PORT = 8000
DEFAULT_MAX_BATCH = 32
DEFAULT_MAX_QUEUE = 16
DEFAULT_QUEUE_DELAY_US = 5000
DEFAULT_TIMEOUT_S = 600.0


@dataclass
class ServeOptions:
    """Everything the server process needs (``ditdeploy serve``'s flags)."""

    engine: Path | None = None  # None: the shipped digits model
    backend: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # backend options (generation.BACKEND_OPTIONS keys)
    vae: Path | None = None
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    grpc_port: int | None = None  # None: port + 1
    metrics_port: int | None = None  # None: port + 2
    max_batch: int = DEFAULT_MAX_BATCH  # rows per denoiser call
    max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US
    max_queue: int = DEFAULT_MAX_QUEUE  # generate requests held at once
    request_timeout_s: float = DEFAULT_TIMEOUT_S  # a request's deadline unless it names a shorter timeout_s

    def ports(self) -> tuple[int, int, int]:
        """(http, grpc, metrics)."""
        return (self.port, self.grpc_port if self.grpc_port is not None else self.port + 1,
                self.metrics_port if self.metrics_port is not None else self.port + 2)

    def validate(self) -> None:
        ports = self.ports()
        checks = [
            (all(1 <= p <= 65535 for p in ports), f"ports must be in 1..65535, got {ports}"),
            (len(set(ports)) == 3, f"the HTTP, gRPC and metrics ports must differ, got {ports}"),
            (1 <= self.max_batch <= 4096, f"--max-batch must be in 1..4096, got {self.max_batch}"),
            (1 <= self.max_queue <= 256, f"--max-queue must be in 1..256, got {self.max_queue}"),
            (0 <= self.max_queue_delay_us <= 10_000_000,
             f"--max-queue-delay-us must be in 0..10000000, got {self.max_queue_delay_us}"),
            (0 < self.request_timeout_s <= 24 * 3600,
             f"--request-timeout must be in (0, 86400] seconds, got {self.request_timeout_s}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise DitDeployError(msg)

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        return json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in d.items()})

    @classmethod
    def from_json(cls, text: str) -> ServeOptions:
        d = json.loads(text)
        for k in ("engine", "vae"):
            if d.get(k) is not None:
                d[k] = Path(d[k])
        return cls(**d)
