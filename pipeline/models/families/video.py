"""Qwen-Image's and Wan's autoencoders (diffusers' AutoencoderKLQwenImage, AutoencoderKLWan): video VAEs used on
single frames. They take [B, C, T, H, W]; an image is one frame (T = 1, encoded alone by their causal convolutions:
the latent equals frame 0 of a longer clip's). Their pipelines normalise per channel with the config's latents_mean
and latents_std, (z - mean_c) / std_c (pipelines/qwenimage, pipelines/wan). Their decoders clamp to [-1, 1]; their
temporal convolutions never see a single frame, so they are frozen in training (DDP would wait for their gradients).
Qwen-Image's network is Wan 2.1's; Wan 2.2 patchifies the pixels inside the model (patch_size)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.models.families.base import Family, Latent

if TYPE_CHECKING:
    import torch


def frames_factor(config) -> int:
    """The spatial downsampling of a Wan-style network: one 2x step per entry of temperal_downsample (diffusers'
    spelling), times Wan 2.2's pixel patch."""
    return 2 ** len(config["temperal_downsample"]) * (config.get("patch_size") or 1)


class VideoFamily(Family):

    def factor_of_config(self, config) -> int:
        return frames_factor(config)

    def encode(self, model, x: torch.Tensor) -> Latent:
        posterior = model.encode(x.unsqueeze(2)).latent_dist
        return Latent(posterior.mean[:, :, 0], posterior.logvar[:, :, 0])

    def decode(self, model, z: torch.Tensor) -> torch.Tensor:
        return model.decode(z.unsqueeze(2)).sample[:, :, 0]

    def untrained_parameters(self, model) -> list[str]:
        return [n for n, _ in model.named_parameters() if ".time_conv." in n]

    def latent_channels(self, model) -> int:
        return model.config.z_dim

    def normalisation(self, model) -> dict:
        c = model.config
        return {"kind": "per_channel", "mean": [float(v) for v in c.latents_mean],
                "std": [float(v) for v in c.latents_std], "patch": 1, "source": "the model's latents_mean / latents_std"}

    def set_normalisation(self, model, spec: dict) -> None:
        model.register_to_config(latents_mean=list(spec["mean"]), latents_std=list(spec["std"]))


class QwenImageFamily(VideoFamily):
    name = "qwenimage"
    class_names = ("AutoencoderKLQwenImage",)

    def image_channels(self, model) -> int:
        return model.config.input_channels


class WanFamily(VideoFamily):
    name = "wan"
    class_names = ("AutoencoderKLWan",)

    def image_channels(self, model) -> int:
        c = model.config
        return c.in_channels // (c.patch_size or 1) ** 2  # Wan 2.2 counts the patchified channels
