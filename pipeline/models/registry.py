"""Every class of diffusers.models.autoencoders, classified without importing torch or diffusers: the classes a model
family holds (each family declares its own, pipeline.models.families), and the audio, video and other autoencoders
refused as what they are; which family a weights folder's config names, known before any model is loaded (a stage's
checks come before its heavy imports)."""

from __future__ import annotations

from pipeline.errors import UserError
from pipeline.models.families import FAMILIES
from pipeline.models.families.generic import GENERIC  # noqa: F401 (the generic families' classes)

# the rest of diffusers.models.autoencoders: refused as what they are, in one line
AUDIO = ("AutoencoderOobleck", "AutoencoderSAME", "AutoencoderKLKVAEAudio", "AutoencoderKLLTX2Audio",
         "AutoencoderKLMiniMaxH3Audio", "Cosmos3AVAEAudioTokenizer", "LongCatAudioDiTVae", "MMAudioVAE",
         "MMAudioVocoder", "MiniMaxMusic3Vocoder")
VIDEO = ("AutoencoderKLAllegro", "AutoencoderKLCogVideoX", "AutoencoderKLHunyuanVideo", "AutoencoderKLHunyuanVideo15",
         "AutoencoderKLKVAEVideo", "AutoencoderKLLTXVideo", "AutoencoderKLLTX2Video", "AutoencoderKLMagvit",
         "AutoencoderKLMochi", "AutoencoderVidTok", "Kandinsky6SRVAE", "LTX2VideoDiffusionDecoderModel")
OTHER = {"RFD4ProteinaAutoencoder": "a protein structure autoencoder"}


def refused_class(class_name: str | None) -> str | None:
    """Why a class of diffusers.models.autoencoders is not an image autoencoder firststage takes, or None."""
    if class_name in AUDIO:
        return f"{class_name} is an audio autoencoder; firststage takes image autoencoders"
    if class_name in VIDEO:
        return (f"{class_name} is a video autoencoder; firststage takes image autoencoders (and the single frames of "
                f"Wan, Qwen-Image and the video VAEs of image pipelines: docs/model-families.md)")
    if class_name in OTHER:
        return f"{class_name} is {OTHER[class_name]}, not an image autoencoder"
    return None


def family_of_class_name(class_name: str | None) -> str | None:
    """The family whose diffusers class has this name (a diffusers folder's config.json `_class_name`), or None;
    one line for a class of diffusers.models.autoencoders that is not an image autoencoder."""
    why = refused_class(class_name)
    if why:
        raise UserError(why)
    return next((f.name for f in FAMILIES.values() if class_name in f.class_names), None)

