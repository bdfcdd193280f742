"""What the trainers report besides their losses: step metrics averaged over a logging interval (one host sync per
interval), and throughput, model FLOPs and MFU."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch

from ldm_core import distributed
from ldm_core.flops import peak_flops

log = logging.getLogger(__name__)


class MetricWindow:
    """Averages step metrics over a logging interval without a host sync per step (values stay tensors)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.n = 0
        self.history: dict[str, list[tuple[int, float]]] = {}

    def add(self, logs: dict[str, torch.Tensor]) -> None:
        for k, v in logs.items():
            v = v.detach().float() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.n += 1

    def flush(self, step: int, **extra: float) -> dict[str, float]:
        """Means since the last flush (over all processes when distributed: every rank must call it at this step)."""
        keys = sorted(self.sums)
        if keys and distributed.is_distributed():
            dev = self.sums[keys[0]].device
            stacked = distributed.all_reduce_mean(torch.stack([self.sums[k].float().reshape(()).to(dev) for k in keys]))
            self.sums = dict(zip(keys, stacked.unbind()))
        means = {k: float(v) / max(self.n, 1) for k, v in self.sums.items()}  # one sync per interval
        means.update(extra)
        for k, v in means.items():
            self.history.setdefault(k, []).append((step, v))
        self.sums, self.n = {}, 0
        return means


_PEAKS: dict[tuple[str, str], float | None] = {}


class ThroughputMeter:
    """Samples/s, model FLOPs per sample and MFU, for the tracker.

    ``flops``: a function returning the FLOPs per sample of each kind of pass (e.g. the autoencoder's generator
    step before and after the discriminator starts, and the discriminator step), counted on meta tensors
    (`ldm_core.flops`), called once, at the first report; counting on the real step would perturb its numerics
    (and so exact resume). The peak is the device's: the measured matmul rate on CPU (once per process), the
    datasheet on known GPUs. MFU = FLOPs/sample × samples/s per device ÷ peak.
    """

    def __init__(
        self,
        device: torch.device,
        precision: str,
        world_size: int = 1,
        flops: Callable[[], dict[str, float]] | None = None,
    ):
        self.device, self.precision, self.world_size = device, precision, world_size
        self._flops_fn, self._flops = flops, None
        self.t0 = time.perf_counter()
        self.samples = 0

    def add(self, samples: int) -> None:
        self.samples += samples

    def rate(self) -> float:
        """Global samples per second since the meter was created."""
        return self.samples / max(time.perf_counter() - self.t0, 1e-9)

    def peak(self) -> float | None:
        key = (self.device.type, self.precision)
        if key not in _PEAKS:
            _PEAKS[key] = peak_flops(self.device, self.precision)
        return _PEAKS[key]

    def flops(self) -> dict[str, float]:
        if self._flops is None:
            try:
                self._flops = self._flops_fn() if self._flops_fn is not None else {}
            except Exception as e:  # a model the counter cannot trace must not stop training
                log.warning("could not count model FLOPs (%s); MFU will not be reported", e)
                self._flops = {}
        return self._flops

    def metrics(self, kinds: Sequence[str], name: str = "samples_per_second") -> dict[str, float]:
        rate = self.rate()
        out = {name: rate}
        flops = sum(self.flops().get(k, 0.0) for k in kinds)
        if flops:
            achieved = flops * rate / self.world_size  # per device
            out["model_tflops_per_device"] = achieved / 1e12
            peak = self.peak()
            if peak:
                out["mfu"] = achieved / peak
        return out
