"""A training spec: everything one stage's trainer needs, as plain data that can cross a process boundary.

The asset builds a spec from its config and inputs; `pipeline.distributed.launch.train` then either runs it in the
asset's own process or writes it to a JSON file for ``torchrun`` to hand to every rank
(``python -m pipeline.distributed.train_vae spec.json``). Either way the same ``spec.train(tracker)`` runs, so
the two paths cannot drift apart. Rank 0 writes the trained model to ``output_url``; the asset loads it from there.
A SIGTERM or SIGINT during ``train`` ends it at the next step with a checkpoint, then raises `TrainingInterrupted`
(`ldm_core.trainers.preemption`): the retry resumes there.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, TypeAdapter
from torch import nn

from ldm_core import distributed
from ldm_core.bundle import load_autoencoder, load_denoiser, save_autoencoder, save_denoiser
from ldm_core.config import StrictModel
from ldm_core.data import ImageShardDataset
from ldm_core.data.latent_dataset import LatentDataset
from ldm_core.diffusion import create_diffusion
from ldm_core.generation import generate
from ldm_core.grids import make_grid, upscale_nearest
from ldm_core.init_weights import from_saved_denoiser
from ldm_core.text_encoder import TextEncoder, TextEncoderConfig
from ldm_core.tracking import Tracker
from ldm_core.trainers.autoencoder import AutoencoderTrainingConfig, AutoencoderTrainResult, train_autoencoder
from ldm_core.trainers.ldm import LDMTrainerConfig, LDMTrainingConfig, LDMTrainResult, train_ldm
from ldm_core.trainers.preemption import train_stoppable
from ldm_core.trainers.run_setup import resolve_device


class _Spec(StrictModel):
    training: dict[str, Any]
    """The stage's training config (``to_dict()`` of its ldm_core config, compute settings applied)."""
    checkpoint_dir: str
    """Resumable checkpoints (same data + config -> same directory, so a re-run resumes)."""
    output_url: str
    """Where rank 0 saves the trained model (safetensors + config) for the asset to load."""
    mlflow_tracking_uri: str | None = None
    """The asset's MLflow tracking store; rank 0 logs to ``mlflow_run_id`` there."""
    mlflow_run_id: str | None = None
    """The asset's MLflow run (metrics, params and images of the training land in it)."""
    collective_timeout_s: float | None = Field(default=None, gt=0)
    """How long each rank's collectives wait for the others before failing (``compute.collective_timeout_s``);
    None: ldm_core.distributed's default."""

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2))


class VaeTrainSpec(_Spec):
    """Stage 1: train the autoencoder on the canonical dataset's training split."""

    stage: Literal["vae"] = "vae"
    dataset_url: str
    """The canonical dataset (image_dataset's ``dataset_url``)."""
    resolution: int
    """Training image side."""
    cache_images: bool = True
    """Keep decoded training images in memory."""
    init_url: str | None = None
    """A saved autoencoder to start from (a converted pretrained one); None: the seeded random initialisation."""

    def config(self) -> AutoencoderTrainingConfig:
        return AutoencoderTrainingConfig.model_validate(self.training)

    def dataset(self) -> torch.utils.data.Dataset:
        return ImageShardDataset(
            self.dataset_url, split="train", resolution=self.resolution, cache_decoded=self.cache_images
        )

    def train(self, tracker: Tracker, data: torch.utils.data.Dataset | None = None) -> AutoencoderTrainResult:
        """Train (or resume); ``data`` lets an in-process caller reuse a dataset it already holds."""
        init = load_autoencoder(self.init_url).state_dict() if self.init_url else None
        data = data if data is not None else self.dataset()
        return train_stoppable(
            "autoencoder",
            lambda stop: train_autoencoder(
                self.config(), data, tracker, self.checkpoint_dir, init_weights=init, should_stop=stop
            ),
        )

    def save_model(self, model: nn.Module) -> None:
        save_autoencoder(self.output_url, model)

    def load_model(self) -> nn.Module:
        return load_autoencoder(self.output_url)

    result_type: ClassVar[type] = AutoencoderTrainResult


class LdmTrainSpec(_Spec):
    """Stage 2: train the denoiser on the latent store, with validation grids through the frozen VAE."""

    stage: Literal["ldm"] = "ldm"
    store_url: str
    """The latent store (latent_store's ``store_url``)."""
    vae_url: str
    """The frozen autoencoder that decodes the validation samples."""
    text_encoder: dict[str, Any]
    """The text encoder config the store was encoded with (encodes the validation prompts)."""
    latent_shape: list[int]
    """(C, h, w) of one latent."""
    guidance: float
    """Classifier-free guidance scale of the validation samples."""
    validation_prompts: list[str]
    validation_seeds: int
    init_weights_url: str | None = None
    """A warm start: the saved denoiser whose weights the training starts from (`pipeline.init_from`); None: from
    scratch."""
    init_sha256: str | None = None
    """The content hash those weights must have (`ldm_core.model_io.state_dict_sha256`)."""

    def init_weights(self) -> dict[str, torch.Tensor] | None:
        """The starting weights, refused unless they are the ones the asset planned (a copy overwritten since)."""
        if self.init_weights_url is None:
            return None
        init = from_saved_denoiser(self.init_weights_url)
        if init.sha256 != self.init_sha256:
            raise ValueError(
                f"{self.init_weights_url}: init weights hash {init.sha256[:12]}…, the run planned "
                f"{str(self.init_sha256)[:12]}…"
            )
        return init.state_dict

    def config(self) -> LDMTrainingConfig:
        return LDMTrainingConfig.model_validate(self.training)

    def dataset(self) -> torch.utils.data.Dataset:
        return ldm_training_data(self.store_url, self.config().trainer)

    def sample_fn(
        self, config: LDMTrainingConfig, vae: nn.Module | None = None
    ) -> Callable[[nn.Module, int], np.ndarray]:
        """Validation grids (prompts × seeds) from the model being trained, for the tracker."""
        vae = vae if vae is not None else load_autoencoder(self.vae_url)
        text_encoder = TextEncoder(TextEncoderConfig.model_validate(self.text_encoder))
        diffusion = create_diffusion(config.diffusion)
        device = resolve_device(config.trainer.device)
        latent_shape = tuple(self.latent_shape)

        def sample(model: nn.Module, step: int) -> np.ndarray:
            prompts = [p for p in self.validation_prompts for _ in range(self.validation_seeds)]
            images = generate(
                prompts,
                vae,
                model,
                text_encoder,
                diffusion,
                latent_shape,
                guidance=self.guidance,
                seed=0,
                device=device,
            )
            model.train()
            return upscale_nearest(make_grid(images, ncols=self.validation_seeds), 2)

        return sample

    def train(
        self, tracker: Tracker, data: torch.utils.data.Dataset | None = None, vae: nn.Module | None = None
    ) -> LDMTrainResult:
        config = self.config()
        data = data if data is not None else self.dataset()
        # only rank 0 renders validation grids: the other ranks need neither the VAE nor the text encoder
        sample_fn = self.sample_fn(config, vae) if distributed.is_main() else None
        init = self.init_weights()
        return train_stoppable(
            "LDM",
            lambda stop: train_ldm(
                config,
                data,
                tracker,
                uncond=data.uncond(),
                checkpoint_dir=self.checkpoint_dir,
                sample_fn=sample_fn,
                init_weights=init,
                should_stop=stop,
            ),
        )

    def save_model(self, model: nn.Module) -> None:
        save_denoiser(self.output_url, model)

    def load_model(self) -> nn.Module:
        return load_denoiser(self.output_url)

    result_type: ClassVar[type] = LDMTrainResult


def ldm_training_data(store_url: str, trainer: LDMTrainerConfig) -> LatentDataset:
    """The store's train split as `train_ldm` with this trainer config reads it: posterior samples (seeded by the
    trainer's seed) when ``trainer.sample_posterior``, else the posterior means."""
    return LatentDataset(store_url, split="train", sample_posterior=trainer.sample_posterior, seed=trainer.seed)


TrainSpec = Annotated[VaeTrainSpec | LdmTrainSpec, Field(discriminator="stage")]
_ADAPTER: TypeAdapter = TypeAdapter(TrainSpec)


def read_spec(path: str | Path) -> VaeTrainSpec | LdmTrainSpec:
    return _ADAPTER.validate_json(Path(path).read_text())


# ---------------------------------------------------------------------------------------------------------------
# A train result without its model, as JSON (what rank 0 reports back through Dagster Pipes)
# ---------------------------------------------------------------------------------------------------------------


def result_summary(result: AutoencoderTrainResult | LDMTrainResult) -> dict[str, Any]:
    """Every field of a train result but the model, JSON-able; the history keeps the last point of each metric
    (the whole curves are in the MLflow run, and a message through Pipes should stay small)."""
    fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(result) if f.name != "model"}
    fields["history"] = {k: v[-1:] for k, v in result.history.items()}
    return json.loads(json.dumps(fields))


def result_from_summary(
    spec: VaeTrainSpec | LdmTrainSpec, summary: dict[str, Any], model: nn.Module
) -> AutoencoderTrainResult | LDMTrainResult:
    """The train result the in-process path would have returned, from rank 0's summary and the saved model."""
    fields = dict(summary)
    fields["history"] = {k: [tuple(p) for p in v] for k, v in fields.get("history", {}).items()}
    return spec.result_type(model=model, **fields)
