"""The model families by name, without importing torch or diffusers: what a weights folder's config names, and what
a family stores, known before any model is loaded (a stage's checks come before its heavy imports).
pipeline.models.families holds the families themselves and takes their classes from here."""

from __future__ import annotations

from pipeline.errors import UserError

# every image autoencoder in diffusers.models.autoencoders (0.42) that no family of its own holds: the generic
# families take it, an image [B, C, H, W] ("image") or one frame of a video VAE [B, C, 1, H, W] ("frame"); its
# encoder gives a Gaussian posterior (family generic) or a deterministic latent (generic-latent: Cosmos)
GENERIC = {"AsymmetricAutoencoderKL": "image", "AutoencoderKLHunyuanImage": "image", "AutoencoderKLKVAE": "image",
           "AutoencoderKLTemporalDecoder": "image", "ConsistencyDecoderVAE": "image",
           "AutoencoderKLCosmos": "frame", "AutoencoderKLHunyuanImageRefiner": "frame",
           "AutoencoderKLMiniMaxH3": "frame", "AutoencoderKLQwenImage21": "frame"}
DETERMINISTIC = ("AutoencoderKLCosmos",)
# the rest of diffusers.models.autoencoders: refused as what they are, in one line
AUDIO = ("AutoencoderOobleck", "AutoencoderSAME", "AutoencoderKLKVAEAudio", "AutoencoderKLLTX2Audio",
         "AutoencoderKLMiniMaxH3Audio", "Cosmos3AVAEAudioTokenizer", "LongCatAudioDiTVae", "MMAudioVAE",
         "MMAudioVocoder", "MiniMaxMusic3Vocoder")
VIDEO = ("AutoencoderKLAllegro", "AutoencoderKLCogVideoX", "AutoencoderKLHunyuanVideo", "AutoencoderKLHunyuanVideo15",
         "AutoencoderKLKVAEVideo", "AutoencoderKLLTXVideo", "AutoencoderKLLTX2Video", "AutoencoderKLMagvit",
         "AutoencoderKLMochi", "AutoencoderVidTok", "Kandinsky6SRVAE", "LTX2VideoDiffusionDecoderModel")
OTHER = {"RFD4ProteinaAutoencoder": "a protein structure autoencoder"}

# family (model.kind) -> the diffusers classes it holds (FSQ has none: no diffusers model has its quantizer)
FAMILY_CLASSES = {"kl": ("AutoencoderKL",), "vq": ("VQModel",), "fsq": (), "dc": ("AutoencoderDC",),
                  "flux2": ("AutoencoderKLFlux2",), "qwenimage": ("AutoencoderKLQwenImage",),
                  "wan": ("AutoencoderKLWan",), "tiny": ("AutoencoderTiny",), "rae": ("AutoencoderRAE",),
                  "generic": tuple(n for n in GENERIC if n not in DETERMINISTIC), "generic-latent": DETERMINISTIC}
# what its encoder gives: a Gaussian posterior, code indices, or a deterministic latent; what encode stores of each is
# pipeline.latents.format's StoredKind whose `of` it is (format.stored_kind: a posterior as encode.store asks)
LATENT = {"kl": "posterior", "flux2": "posterior", "qwenimage": "posterior", "wan": "posterior", "vq": "codes",
          "fsq": "codes", "dc": "latent", "tiny": "latent", "rae": "latent", "generic": "posterior",
          "generic-latent": "latent"}


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
    return next((kind for kind, names in FAMILY_CLASSES.items() if class_name in names), None)


def diffusers_classes(kind: str) -> tuple[type, ...]:
    import diffusers

    return tuple(getattr(diffusers, name) for name in FAMILY_CLASSES[kind])


def rae_section(c: dict) -> dict:
    """The model.rae keys of an AutoencoderRAE config (config.json or a model's), without torch: what a light config
    needs to check data.resolution against the image size it decodes."""
    get = c.get  # AutoencoderRAE's defaults where a key is absent
    return {"encoder": {"type": get("encoder_type", "dinov2"), "hidden_size": get("encoder_hidden_size", 768),
                        "patch_size": get("encoder_patch_size", 14), "num_layers": get("encoder_num_hidden_layers", 12),
                        "input_size": get("encoder_input_size", 224), "backbone": "random",
                        "norm_mean": get("encoder_norm_mean"), "norm_std": get("encoder_norm_std")},
            "decoder_hidden_size": get("decoder_hidden_size", 512),
            "decoder_layers": get("decoder_num_hidden_layers", 8),
            "decoder_heads": get("decoder_num_attention_heads", 16),
            "decoder_intermediate_size": get("decoder_intermediate_size", 2048), "patch_size": get("patch_size", 16)}
