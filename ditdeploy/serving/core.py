"""The server's work without the transport: load the deployment, admit requests, run them through the batchers.

:class:`ServingCore` answers the three models' requests (``server.py`` binds them to Triton). Admission: at most ``max_queue`` generate requests
are held at once (running or waiting for rows); one more is refused at once with UNAVAILABLE (HTTP 503) before
anything is allocated.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ditdeploy.errors import DitDeployError
from ditdeploy.serving.batcher import BatchedDenoiser, RowBatcher
from ditdeploy.serving.options import ServeOptions
from ditdeploy.serving.protocol import GenerateRequest, WireError, bad_request, busy


class Slots:
    """A counter of admitted requests: ``take`` refuses (no waiting) when ``limit`` are held."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0
        self.refused = 0
        self._lock = threading.Lock()

    def take(self) -> None:
        with self._lock:
            if self.held >= self.limit:
                self.refused += 1
                raise busy(f"server busy: {self.held} generate requests in flight (--max-queue {self.limit}); "
                           "retry later")
            self.held += 1

    def give(self) -> None:
        with self._lock:
            self.held -= 1


class ServingCore:
    """The loaded deployment, the denoiser and decoder batchers, and admission."""

    def __init__(self, opts: ServeOptions):
        from ditdeploy.run import generation
        from ditdeploy.run.deployment import open_deployment

        self.opts = opts
        self.deployment = open_deployment(opts.engine, opts.backend, opts.options, vae=opts.vae)
        self.den, self.decoder = self.deployment.denoiser, self.deployment.decoder
        cfg = self.den.config
        self.names = self.deployment.class_names
        self.default_cfg = generation.default_cfg(cfg)
        fns: dict[str, Any] = {"plain": self.den}
        if getattr(self.den, "supports_cache", False):
            fns.update(full=self.den.forward_full, light=self.den.forward_light)
        delay = opts.max_queue_delay_us / 1e6
        self.batcher = RowBatcher(fns, opts.max_batch, delay, name="denoiser-batcher")
        self.decode_batcher = (RowBatcher({"plain": self.decoder}, opts.max_batch, delay, name="decoder-batcher")
                               if self.decoder is not None else None)
        self.slots = Slots(opts.max_queue)
        self.pool = ThreadPoolExecutor(max_workers=opts.max_queue, thread_name_prefix="generate")
        self.stopping = threading.Event()
        self.completed = 0
        self.failed = 0
        self.cancel_dir: Path | None = None  # where the Triton-side proxy marks cancelled requests (server.py)
        self._lock = threading.Lock()

    def _count(self, what: str) -> None:
        with self._lock:
            setattr(self, what, getattr(self, what) + 1)

    # ------------------------------------------------------------------------------------------------- generate
    def max_images(self) -> int:
        """Images one request may hold: its rows (2 per image when guided) must fit one denoiser call."""
        return max(1, self.opts.max_batch // (2 if self.default_cfg != 1.0 else 1))

    def admit(self, labels: Any, parameters: dict[str, Any] | None) -> GenerateRequest:
        """Parse, check and take a slot (one-line 400 / 503 errors; nothing allocated when refused)."""
        if self.stopping.is_set():
            raise busy("the server is stopping")
        req = GenerateRequest.from_wire(labels, parameters, self.opts.max_batch)
        from ditdeploy.config.labels import resolve_items
        from ditdeploy.diffusion import check_cache_interval

        s = req.sampling
        cfg = self.den.config
        try:
            req.labels = list(resolve_items(req.labels, self.names, cfg.num_classes))
            check_cache_interval(s.cache_interval, self.den)
            if s.cfg_scale is not None and s.cfg_scale != 1.0 and cfg.class_dropout_prob == 0:
                raise DitDeployError("this model has no null class: cfg_scale must be 1")
        except WireError:
            raise
        except DitDeployError as e:
            raise bad_request(str(e)) from None
        cfg_scale = s.cfg_scale if s.cfg_scale is not None else self.default_cfg
        rows = len(req.labels) * (2 if cfg_scale != 1.0 else 1)
        if rows > self.opts.max_batch:
            raise bad_request(f"{len(req.labels)} image(s) at cfg {cfg_scale:g} need {rows} rows per step, more than "
                              f"this server's --max-batch {self.opts.max_batch}: send fewer images per request")
        s.cfg_scale = cfg_scale
        self.slots.take()
        return req

    def run(self, req: GenerateRequest) -> dict[str, np.ndarray]:
        """Sample and decode an admitted request (blocking; frees its slot)."""
        from ditdeploy.run import generation, images

        admitted = time.monotonic()
        cancel_file = self.cancel_dir / req.token if self.cancel_dir is not None and req.token else None
        try:
            timeout = min(req.timeout_s or self.opts.request_timeout_s, self.opts.request_timeout_s)
            den = BatchedDenoiser(self.batcher, self.den, time.monotonic() + timeout, timeout, self.stopping,
                                  cancel_file)
            labels = np.asarray(req.labels, dtype=np.int64)
            indices = np.arange(req.first_index, req.first_index + len(labels), dtype=np.int64)
            with self.batcher.session():
                x0 = generation.sample_batch(den, req.sampling, req.sampling.cfg_scale, labels, indices)
            if self.decode_batcher is not None:
                x0 = self.decode_batcher.run("plain", x0)
            # time to admission: from the slot taken to the start of the first denoiser call holding its rows
            wait = (den.first_call_at - admitted) if den.first_call_at is not None else float("nan")
            out = {"images": images.to_uint8(x0), "labels": labels,
                   "admission_s": np.array([max(0.0, wait)], dtype=np.float32)}
            self._count("completed")
            return out
        except BaseException:
            self._count("failed")
            raise
        finally:
            self.slots.give()
            if cancel_file is not None:
                cancel_file.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------------- denoise
    def denoise(self, x: Any, t: Any, y: Any) -> np.ndarray:
        """The artifact's own call for clients that run their own loop; rows share calls with generate's."""
        from ditdeploy.runtimes.base import prepare_denoiser_inputs

        cfg = self.den.config
        try:
            x, t, y = prepare_denoiser_inputs(x, np.asarray(t).reshape(-1), np.asarray(y).reshape(-1), cfg)
        except DitDeployError as e:
            raise bad_request(str(e)) from None
        if not np.isfinite(x).all():
            raise bad_request("x contains NaN/Inf")
        if t.size and (t.min() < 0 or t.max() > 999):
            raise bad_request(f"t must lie in 0..999, got {t.min()}..{t.max()}")
        n_null = cfg.num_classes + (1 if cfg.class_dropout_prob > 0 else 0)
        if y.size and (y.min() < 0 or y.max() >= n_null):
            raise bad_request(f"y must lie in 0..{n_null - 1} (the null class is {cfg.num_classes}), "
                              f"got {y.min()}..{y.max()}")
        if self.stopping.is_set():
            raise busy("the server is stopping")
        return np.asarray(self.batcher.run("plain", x, t, y), dtype=np.float32)

    # ------------------------------------------------------------------------------------------------- info
    def info(self) -> dict[str, Any]:
        """Model, limits and counters (the ``info`` model's answer; ``sample --server`` reads it first)."""
        cfg = self.den.config
        side = cfg.input_size * (8 if self.decoder is not None else 1)
        return {
            "config": dataclasses.asdict(cfg), "backend": self.den.name,
            "decoder": self.decoder.name if self.decoder is not None else None,
            "class_names": {str(k): v for k, v in (self.names or {}).items()},
            "image_shape": [side, side, 3 if self.decoder is not None else cfg.in_channels],
            "default_cfg_scale": self.default_cfg, "supports_cache": bool(getattr(self.den, "supports_cache", False)),
            "max_batch": self.opts.max_batch, "max_queue": self.opts.max_queue,
            "max_images_per_request": self.max_images(), "request_timeout_s": self.opts.request_timeout_s,
            "stats": {"denoiser": self.batcher.counters.as_dict(),
                      "decoder": self.decode_batcher.counters.as_dict() if self.decode_batcher else None,
                      "in_flight": self.slots.held, "refused": self.slots.refused,
                      "completed": self.completed, "failed": self.failed},
        }

    def close(self) -> None:
        """Refuse new work, fail the waiting rows ("the server is stopping"), release the runtime. Idempotent."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        self.batcher.close()
        if self.decode_batcher is not None:
            self.decode_batcher.close()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.den.close()
        if self.decoder is not None:
            self.decoder.close()
