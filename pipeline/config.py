"""The one typed schema for every firststage config.

A config is a YAML file (one per experiment in configs/) loaded into the nested dataclasses below, then dotted
overrides from the command line (`train.max_steps=100 loss.kl.weight=1e-6`). A YAML file may start from another with
`base: kl-f8` (a preset name or a path), so a derived run is a preset plus a few keys.

The `model:` section holds the keys every family shares and each family's own: a family declares its keys, checks
them and gives its downsampling factor in its module (pipeline.models.families, read without torch); this module
reaches the families only through their table, FAMILIES.

Every mistake is a ConfigError with one line that names the key: a misspelt key (with the closest valid one), a
wrong type, a value out of range or not among the allowed choices. Validation happens at load time, before any work.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from pipeline.errors import ConfigError
from pipeline.models.families import DEFAULT as DEFAULT_KIND, FAMILIES, family
from pipeline.schema import key as _f, sections

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


# ----------------------------------------------------------------------------------------------------------- data
# The largest file or tar member read as one sample. An image within prepare.max_pixels (1e8) is at most ~400 MB even
# as an uncompressed 32-bit BMP, a latent of a 4096 px image (f8, 16 channels, moments in float32) 33 MB; a sparse
# 2 GiB member in a 10 KB shard, or a link to /dev/zero, is neither, and is skipped before its bytes are read.
MAX_MEMBER_BYTES = 512 * 2**20


@dataclass
class DataConfig:
    train: str = _f("", "training shards: brace pattern, folder, list file or manifest.json")
    val: str = _f("", "held-out shards for validation and reconstruction grids (same forms as train)")
    resolution: int = _f(256, "crop size fed to the model (pixels, square)", min=8)
    crop: Literal["random", "random-resized", "center"] = _f("random", "training crop")
    random_resized_scale: list[float] = _f([0.5, 1.0], "area fraction range for crop=random-resized")
    flip: bool = _f(True, "random horizontal flip in training")
    shuffle_buffer: int = _f(1000, "samples held in the shuffle buffer of each loader worker", min=0)
    num_workers: Optional[int] = _f(None, "loader worker processes per rank; null: from the machine (one fewer than "
                                    "the cores of each of this job's processes on the node, at most 8)", min=0)
    max_bad_samples: int = _f(1000, "undecodable training samples in a row before the run stops", min=1)
    max_member_bytes: int = _f(MAX_MEMBER_BYTES, "tar members larger than this (bytes; the tar header's size, sparse "
                               "members at their full size) are not read: their sample is skipped and counted (train, "
                               "evaluate) or listed in the manifest (encode)", min=1)
    allow_pipe: bool = _f(False, "let data.train / data.val / --data name `pipe:COMMAND` sources (webdataset runs "
                          "COMMAND in a shell); off: such a source is refused")


@dataclass
class PrepareConfig:
    size: int = _f(256, "target size in pixels (prepare --size)", min=1)
    resize: Literal["shorter-side", "longer-side", "center-crop"] = _f(
        "shorter-side", "shorter-side / longer-side: scale down so that side is `size` (never up); center-crop: squares"
    )
    min_size: int = _f(0, "skip images whose shorter side is below this", min=0)
    shard_size: int = _f(1000, "inputs per shard", min=1)
    format: Literal["jpg", "webp", "keep"] = _f("jpg", "stored image format; keep: the source's (JPEG, PNG, WEBP)")
    quality: int = _f(95, "JPEG / WEBP quality", min=1, max=100)
    prefix: str = _f("shards", "shard name prefix: letters, digits, '_', '-', '.'")
    workers: int = _f(1, "processes (decoding is CPU-bound)", min=1)
    max_pixels: int = _f(100_000_000, "images with more pixels are skipped and listed (JPEGs decode at reduced scale "
                         "when that fits): bounds each worker's memory", min=1)
    max_file_bytes: int = _f(MAX_MEMBER_BYTES, "input images (files, objects or tar members) larger than this (bytes) "
                             "are skipped and listed before they are read; inputs that are not regular files (a FIFO, "
                             "a link to a device) are skipped and listed too, never read", min=1)
    image_column: str = _f("", "Parquet input: the column of encoded images (default: found by type, a binary "
                           "column or a struct with bytes)")


# ---------------------------------------------------------------------------------------------------------- model
@dataclass
class ModelKeys:
    """The `model:` keys every family shares. The section's other keys are the families' own: each family declares
    them (its `keys` dataclass, pipeline.models.families) and model_schema() joins them in."""

    kind: str = _f(DEFAULT_KIND, "a family without model.* keys of its own is built from model.diffusers (set by "
                   "train.init_from)")  # model_schema: "model family: <the table's rows>; " before this
    in_channels: int = _f(3, "image channels", min=1)
    latent_channels: int = _f(4, "channels of the latent", min=1)
    scaling_factor: float = _f(0.18215, "latent scale so that scaled latents have unit variance (diffusers convention)")
    shift_factor: Optional[float] = _f(None, "latent shift subtracted before scaling (SD3/FLUX convention); null for none")
    diffusers: dict = _f({}, "the diffusers config of a model whose shape its family's own model.* keys do not "
                         "describe (or of a family that has none); written by train.init_from, empty otherwise")


class ModelConfig:
    """The `model:` section: the shared keys (ModelKeys) and every family's own, a dataclass that model_schema()
    assembles from the family table whenever a config is built, so that the families own their keys and this module
    names none of them. `ModelConfig(...)` builds one; two are equal when their keys are."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(model_schema() if cls is ModelConfig else cls)

    def __eq__(self, other) -> bool:
        return isinstance(other, ModelConfig) and dataclasses.asdict(self) == dataclasses.asdict(other)

    __hash__ = None  # mutable, as every section

    def __reduce__(self):  # pickled by value: a process with the same family table reads it back
        return _model_section, (dataclasses.asdict(self),)

    @property
    def family(self):
        """The family `kind` names (pipeline.models.families.FAMILIES)."""
        return family(self.kind)

    @property
    def downsampling_factor(self) -> int:
        """Spatial downsampling of the model this section builds (its family says)."""
        return self.family.factor_of_section(self)

    def same_model(self, other: "ModelConfig") -> bool:
        """Whether `other` builds the model this section builds, once weights are loaded into it: the same family
        and the same shared and family keys, except those that only initialise a new model's weights."""
        mine, theirs = dataclasses.asdict(self), dataclasses.asdict(other)
        keys = [f for f in dataclasses.fields(ModelKeys) + self.family.own_fields()
                if not f.metadata.get("init_only")]
        return self.kind == other.kind and all(mine[f.name] == theirs.get(f.name) for f in keys)


def model_schema() -> type:
    """The dataclass of the `model:` section for the families the table holds now: `kind` (one of them), the shared
    keys, each family's own keys (a key two families declare, as KL, VQ and FSQ share the SD encoder's, is one key),
    then model.diffusers."""
    shared = dataclasses.fields(ModelKeys)
    hints = typing.get_type_hints(ModelKeys)
    kind = shared[0]
    kind_help = f"model family (docs/model-families.md): {', '.join(FAMILIES)}; {kind.metadata['help']}"
    spec = [("kind", Literal[tuple(FAMILIES)], _f(kind.default, kind_help))]
    spec += [(f.name, hints[f.name], _copy(f)) for f in shared if f.name not in ("kind", "diffusers")]
    owners: dict[str, tuple] = {}
    for fam in FAMILIES.values():
        for f in fam.own_fields():
            owner = owners.setdefault(f.name, (fam.name, f))
            if owner[1] is not f:
                raise TypeError(f"model.{f.name}: declared by the families {owner[0]} and {fam.name}; one key, one "
                                f"declaration (share it by inheriting the keys dataclass)")
            if owner[0] == fam.name:
                spec.append((f.name, typing.get_type_hints(fam.keys)[f.name], _copy(f)))
    spec += [(f.name, hints[f.name], _copy(f)) for f in shared if f.name == "diffusers"]
    schema = dataclasses.make_dataclass("ModelConfig", spec, bases=(ModelConfig,), eq=False)
    schema.__module__ = __name__
    return schema


def _copy(f: dataclasses.Field) -> dataclasses.Field:
    return field(default=f.default, default_factory=f.default_factory, metadata=f.metadata)


def _model_section(data: dict) -> ModelConfig:
    return _build(model_schema(), data, "model.")


# ----------------------------------------------------------------------------------------------------------- loss
@dataclass
class ReconstructionConfig:
    type: Literal["l1", "l2"] = _f("l1", "pixel loss")
    weight: float = _f(1.0, "weight of the pixel loss", min=0.0)
    learned_logvar: bool = _f(False, "learned scalar log-variance: rec / exp(logvar) + logvar (LDM 'nll' form)")
    logvar_init: float = _f(0.0, "initial value of the learned log-variance")


@dataclass
class PerceptualConfig:
    weight: float = _f(1.0, "LPIPS weight; 0 turns it off", min=0.0)
    net: Literal["vgg", "alex"] = _f("vgg", "LPIPS backbone")
    backbone: Literal["pretrained", "random"] = _f(
        "pretrained", "ImageNet backbone weights from TORCH_HOME, or random (tests only: meaningless as a loss)"
    )


@dataclass
class KLConfig:
    weight: float = _f(1.0e-6, "beta: KL weight (SD VAE: 1e-6)", min=0.0)
    schedule: Literal["constant", "linear", "cyclical"] = _f("constant", "beta schedule (KL annealing)")
    warmup_steps: int = _f(0, "linear: steps from 0 to weight", min=0)
    cycle_steps: int = _f(10000, "cyclical: length of one cycle (Fu et al. 2019)", min=1)
    cycle_ramp: float = _f(0.5, "cyclical: fraction of each cycle spent ramping up", min=0.0, max=1.0)
    free_bits: float = _f(0.0, "per-channel KL floor in nats below which KL is not penalised", min=0.0)


@dataclass
class AdversarialConfig:
    enabled: bool = _f(False, "train a PatchGAN discriminator")
    weight: float = _f(0.5, "base weight of the generator's adversarial term", min=0.0)
    start_step: int = _f(50001, "step at which the discriminator starts", min=0)
    loss: Literal["hinge", "non-saturating"] = _f("hinge", "discriminator / generator loss")
    generator_start_step: Optional[int] = _f(
        None, "step at which the generator's adversarial term starts (RAE: 2 epochs after the discriminator); null: "
        "start_step", min=0)
    generator_loss: Optional[Literal["hinge", "non-saturating"]] = _f(
        None, "the generator's loss when it differs from the discriminator's (RAE: hinge D, non-saturating "
        "('vanilla') G); null: loss")
    adaptive_weight: bool = _f(True, "scale by ||grad L_rec|| / (||grad L_gan|| + 1e-4) at the decoder's last layer")
    discriminator: Literal["patchgan", "dino"] = _f(
        "patchgan", "patchgan (taming / LDM), or dino: RAE's heads on a frozen DINO ViT-S/8 with DiffAug")
    dino_model: str = _f("", "dino: a transformers folder of DINO ViT-S/8 (facebook/dino-vits8)")
    dino_backbone: Literal["pretrained", "random"] = _f(
        "pretrained", "dino: the weights at dino_model, or a tiny seeded random ViT (tests only)")
    dino_kernel: int = _f(9, "dino: the heads' convolution kernel (RAE's ks)", min=1)
    diffaug_p: float = _f(1.0, "dino: probability of DiffAug (colour, translation, cutout) per batch", min=0.0,
                          max=1.0)
    disc_layers: int = _f(3, "PatchGAN depth (strided conv layers)", min=1)
    disc_channels: int = _f(64, "PatchGAN width of the first layer", min=1)
    r1_weight: float = _f(0.0, "R1 gradient penalty on real images", min=0.0)
    lecam_weight: float = _f(0.0, "LeCam regularisation (Tseng et al. 2021)", min=0.0)
    lecam_decay: float = _f(0.99, "EMA decay of LeCam anchors", min=0.0, max=1.0)


@dataclass
class VQLossConfig:
    codebook_weight: float = _f(1.0, "weight of codebook + commitment terms", min=0.0)


@dataclass
class EquivarianceConfig:
    """EQ-VAE (Kouzelis et al. 2025, zelaki/eqvae) and scale equivariance (Skorokhodov et al. 2025): the decoder
    trained to commute with transforms of its latent (docs/diffusable-latents.md)."""

    enabled: bool = _f(False, "train the decoder to be equivariant to latent transforms")
    mode: Literal["eq-vae", "scale"] = _f(
        "eq-vae", "eq-vae: with probability p the step decodes a rescaled + rotated latent against the same transform "
        "of the image (instead of the plain reconstruction); scale: an extra term between decode(downsample(z)) and "
        "downsample(x) (Skorokhodov et al. 2025)")
    p: Optional[float] = _f(None, "probability per step; null: the mode's own (eq-vae 0.5, scale 1.0)", min=0.0, max=1.0)
    scale_range: list[int] = _f([8, 31], "eq-vae: rescale factors s drawn uniformly from {a/d, ..., b/d} (EQ-VAE: "
                                "8..31 of 32)")
    scale_denominator: int = _f(32, "eq-vae: d of scale_range", min=1)
    anisotropic: bool = _f(False, "eq-vae: independent factors for height and width")
    rotations: list[int] = _f([1, 2, 3], "eq-vae: rotations drawn with each rescale, in quarter turns (EQ-VAE: 90, "
                              "180, 270 degrees); empty: rescale only")
    prior_low_res: float = _f(0.25, "eq-vae: share of the plain steps whose image is first rescaled by a random s "
                              "(EQ-VAE's prior preservation at lower resolution)", min=0.0, max=1.0)
    scale_factors: list[int] = _f([2, 4], "scale: downsampling factors, one drawn per step")
    scale_weight: float = _f(0.25, "scale: weight of the extra term (alpha)", min=0.0)
    antialias: Optional[bool] = _f(None, "antialiased bilinear resampling; null: the mode's own (eq-vae: false, as "
                                   "its code; scale: true)")


@dataclass
class AlignmentConfig:
    """VA-VAE's vision-foundation alignment (Yao et al. 2025, hustvl/LightningDiT vavae): the latent, projected by a
    learned 1x1 convolution, is pulled towards a frozen DINOv2's patch features."""

    enabled: bool = _f(False, "align the latent with a frozen vision foundation model (VF loss)")
    model: str = _f("", "DINOv2 weights: a transformers folder (facebook/dinov2-large) or timm's "
                    "vit_large_patch14_dinov2.lvd142m model.safetensors (file, or its folder)")
    backbone: Literal["pretrained", "random"] = _f(
        "pretrained", "pretrained: the weights at loss.alignment.model; random: a tiny random DINOv2 (tests only)")
    resolution: int = _f(224, "the image is resized bilinearly to this square before the foundation model", min=14)
    weight: float = _f(0.1, "VF loss weight (vf_weight), times the adaptive weight when that is on", min=0.0)
    adaptive_weight: bool = _f(True, "scale by ||grad L_nll|| / (||grad L_vf|| + 1e-4) at the encoder's last layer")
    max_adaptive_weight: float = _f(1.0e8, "clamp of the adaptive weight (VA-VAE: 1e8)", min=0.0)
    cos_margin: float = _f(0.5, "m_c of ReLU(1 - m_c - cos(proj z, f))", min=0.0, max=2.0)
    distmat_margin: float = _f(0.25, "m_d of ReLU(|cos-sim(z) - cos-sim(f)| - m_d)", min=0.0, max=2.0)
    cos_weight: float = _f(1.0, "weight of the marginal cosine term", min=0.0)
    distmat_weight: float = _f(1.0, "weight of the marginal distance-matrix term", min=0.0)


@dataclass
class LatentNoiseConfig:
    """Decoder training on noisy latents: l-DeTok's interpolation (Yang et al. 2025) or RAE's / sigma-VAE's additive
    noise; then a decoder-only fine-tune without it."""

    kind: Literal["none", "interpolate", "additive"] = _f(
        "none", "interpolate: z' = (1 - t) z + t * strength * eps (l-DeTok); additive: z' = z + t * strength * eps "
        "(RAE, sigma-VAE); t ~ U(0, 1) per sample, eps ~ N(0, I); training only")
    strength: Optional[float] = _f(None, "gamma (interpolate) or the largest sigma (additive); null: the paper's "
                                   "(l-DeTok 3.0, RAE 0.8; sigma-VAE / NextStep-1 use 0.5)", min=0.0)


@sections
class LossConfig:
    reconstruction: ReconstructionConfig
    perceptual: PerceptualConfig
    kl: KLConfig
    adversarial: AdversarialConfig
    vq: VQLossConfig
    equivariance: EquivarianceConfig
    alignment: AlignmentConfig
    latent_noise: LatentNoiseConfig


# ---------------------------------------------------------------------------------------------------------- train
@dataclass
class TrainConfig:
    max_steps: int = _f(100000, "optimizer steps", min=1)
    batch_size: int = _f(8, "samples per device per micro-step", min=1)
    grad_accum: int = _f(1, "micro-steps per optimizer step", min=1)
    lr: float = _f(4.5e-6, "autoencoder learning rate (see lr_scale)", min=0.0)
    disc_lr: float = _f(0.0, "discriminator learning rate; 0 means the same as lr", min=0.0)
    lr_scale: Literal["absolute", "per_sample"] = _f(
        "per_sample", "per_sample: lr is multiplied by the global batch (LDM convention); absolute: used as is"
    )
    lr_schedule: Literal["constant", "cosine"] = _f("constant", "after warm-up")
    final_lr_ratio: float = _f(0.0, "cosine: the learning rate it ends at, as a fraction of lr (RAE: 2e-4 to 2e-5, "
                               "0.1)", min=0.0, max=1.0)
    warmup_steps: int = _f(0, "linear learning-rate warm-up", min=0)
    betas: list[float] = _f([0.5, 0.9], "AdamW betas (LDM autoencoders use 0.5, 0.9)")
    weight_decay: float = _f(0.0, "AdamW weight decay", min=0.0)
    grad_clip: float = _f(1.0, "max global grad norm; 0 turns clipping off", min=0.0)
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = _f("auto", "auto: bf16 where the GPU has it, else fp32")
    ema_decay: float = _f(0.999, "EMA decay of autoencoder weights; 0 turns EMA off", min=0.0, max=1.0)
    ema_every: int = _f(1, "update EMA every N steps", min=1)
    channels_last: bool = _f(True, "channels_last memory format on CUDA")
    compile: bool = _f(False, "torch.compile the encoder and the decoder's blocks (minutes of compilation first)")
    gradient_checkpointing: bool = _f(False, "trade compute for memory in the autoencoder")
    tf32: bool = _f(True, "allow TF32 matmuls and convolutions on CUDA")
    checkpoint_every: int = _f(5000, "steps between checkpoints", min=1)
    keep_checkpoints: int = _f(3, "newest checkpoints kept", min=1)
    log_every: int = _f(50, "steps between logged scalars", min=1)
    image_every: int = _f(1000, "steps between reconstruction grids", min=1)
    val_every: int = _f(5000, "steps between validations (needs data.val)", min=1)
    val_samples: int = _f(256, "samples per validation", min=1)
    max_bad_steps: int = _f(10, "consecutive NaN/Inf steps before the run stops", min=1)
    sigterm_grace: float = _f(100.0, "seconds after SIGTERM to reach a step boundary and save; then exit 75 anyway",
                              min=1.0)
    init_from: str = _f("", "initial weights (any --model format); a model of another family, or one the model.* keys "
                        "cannot describe, brings its own shape")
    trainable: list[str] = _f([], "parameter-name patterns (fnmatch: decoder.*, encoder.conv_out.*) that train; "
                              "empty: all")
    freeze_encoder: bool = _f(False, "train the decoder only (keeps an existing latent space valid); with "
                              "train.trainable, both apply")
    tracker: Literal["tensorboard", "wandb", "none"] = _f("tensorboard", "logging backend")


# ------------------------------------------------------------------------------------------ evaluate and encode
@dataclass
class EvaluateConfig:
    num_samples: int = _f(5000, "samples evaluated", min=1)
    batch_size: int = _f(16, "per device", min=1)
    iwae_k: int = _f(16, "importance samples for the IWAE bound", min=1)
    likelihood_samples: int = _f(64, "samples used for the ELBO/IWAE bounds (costly)", min=0)
    active_unit_threshold: float = _f(0.01, "a latent unit is active when Var_x(E[z|x]) exceeds this", min=0.0)
    decoder_sigma: float = _f(
        0.0, "scale of the discretised Gaussian decoder likelihood in [-1, 1] units; 0: learned (ML over the data)",
        min=0.0,
    )
    diffusability: bool = _f(True, "the diffusability probe: equivariance PSNR (2x downscale, rotations) and the "
                             "latent's high-frequency share (docs/diffusable-latents.md); 4 more decodes per batch")
    lpips_backbone: Literal["pretrained", "random"] = _f(
        "pretrained", "LPIPS backbone weights for the LPIPS rows; random: tests only, the numbers are meaningless"
    )


@dataclass
class EncodeConfig:
    batch_size: int = _f(32, "images per device per encoder call", min=1)
    store: Literal["moments", "mean", "sample"] = _f(
        "moments", "moments: posterior mean and logvar (the diffusion trainer samples fresh noise); mean; sample: one draw"
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = _f(
        "auto", "dtype of stored latents; auto: bfloat16 on GPUs that have it, else float32"
    )
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = _f(
        "auto", "autocast of the encoder; auto: bf16 on GPUs that have it, else full precision"
    )
    flip: bool = _f(False, "also store the latents of the horizontally flipped image (*_flip)")
    sigterm_grace: float = _f(100.0, "seconds after SIGTERM for the encoder to stop at a batch; then exit 75 anyway "
                              "(complete shards stay)", min=1.0)
    buckets: str = _f(
        "none", "none: square data.resolution crops; auto: aspect-ratio buckets of about data.resolution^2 pixels; "
        "or WxH,WxH,..."
    )
    normalisation: Literal["auto", "model", "measured"] = _f(
        "auto", "how the reader normalises latents: model, the family's own (what its diffusers pipeline feeds its "
        "transformer); measured, from these latents' statistics; auto: measured for a firststage run or checkpoint "
        "(its export carries them), model otherwise")


@dataclass
class ProbeConfig:
    """The generation probe (firststage probe, docs/diffusable-latents.md): a diffusion transformer (diffusers'
    DiTTransformer2DModel) trained on latent shards with the rectified-flow objective; its schedule, optimizer, EMA,
    checkpoints and precision are the train.* keys."""

    latents: str = _f("", "latent folder written by firststage encode: what the probe trains on (probe --latents)")
    val: str = _f("", "held-out latent folder for the validation loss; empty: the first val_samples of probe.latents")
    model: str = _f("", "the first stage that decodes the samples (any --model format); empty: the one the latent "
                    "manifest names")
    images: str = _f("", "held-out image shards for the FID of decoded samples (needs Inception weights)")
    depth: int = _f(12, "transformer blocks (LightningDiT-B: 12)", min=1)
    hidden: int = _f(768, "transformer width (LightningDiT-B: 768)", min=1)
    heads: int = _f(12, "attention heads; must divide probe.hidden", min=1)
    patch: int = _f(1, "patch size on the latent (LightningDiT-B/1: 1)", min=1)
    num_classes: int = _f(0, "0: unconditional; N: class-conditional on the shards' `cls` member (0..N-1)", min=0)
    t_sampling: Literal["logit-normal", "uniform"] = _f("logit-normal", "training distribution of t (SiT / "
                                                        "LightningDiT: logit-normal)")
    logit_mean: float = _f(0.0, "logit-normal: mean of logit(t)")
    logit_std: float = _f(1.0, "logit-normal: std of logit(t)", min=0.0)
    val_every: int = _f(500, "steps between validations (also at the last step)", min=1)
    val_samples: int = _f(256, "held-out latents in the validation loss", min=1)
    time_shift: Optional[float] = _f(None, "t -> a t / (1 + (a - 1) t) in training and sampling; null: a = "
                                     "sqrt(latent dimension / 4096) (RAE); 1: no shift", min=0.0)
    sample_steps: int = _f(50, "Euler steps of the sampler (FlowMatchEulerDiscreteScheduler)", min=1)
    num_samples: int = _f(16, "samples decoded into the grid", min=1)
    fid_samples: int = _f(5000, "samples for FID against probe.images (when Inception weights are present)", min=1)


@sections
class Config:
    output_dir: str = _f("runs/default", "run folder: config.yaml, checkpoints/, samples/, logs/")
    seed: int = _f(0, "global seed")
    prepare: PrepareConfig
    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    encode: EncodeConfig
    probe: ProbeConfig


# ------------------------------------------------------------------------------------------------ building it
def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it (converted where lossless) or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}{hint}")
        return value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {_type_name(inner)}, got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp is ModelConfig:  # assembled from the family table (model_schema)
        tp = model_schema()
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-6` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1, cutoff=0.5)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {prefix}{k}{hint}")
        kwargs[k] = _coerce(v, hints[k], prefix + k)
    return cls(**kwargs)


def _check_ranges(obj, prefix: str = "") -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            _check_ranges(value, key + ".")
            continue
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if lo is not None and value < lo:
                raise ConfigError(f"{key}: must be >= {lo}, got {value!r}")
            if hi is not None and value > hi:
                raise ConfigError(f"{key}: must be <= {hi}, got {value!r}")


def validate(cfg: Config) -> Config:
    """Ranges from field metadata, then the checks that relate several keys."""
    _check_ranges(cfg)
    m = cfg.model
    m.family.validate(cfg)  # the family's own keys, and what they say about the rest
    if cfg.data.resolution % m.downsampling_factor:
        raise ConfigError(
            f"data.resolution: {cfg.data.resolution} is not a multiple of the downsampling factor "
            f"{m.downsampling_factor} of the model (model.*)"
        )
    lo_hi = cfg.data.random_resized_scale
    if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
        raise ConfigError(f"data.random_resized_scale: expected [min, max] with 0 < min <= max <= 1, got {lo_hi}")
    if len(cfg.train.betas) != 2 or not all(0 <= b < 1 for b in cfg.train.betas):
        raise ConfigError(f"train.betas: expected two values in [0, 1), got {cfg.train.betas}")
    if cfg.train.mixed_precision == "fp16" and cfg.loss.adversarial.enabled:
        raise ConfigError(
            "train.mixed_precision: fp16 with loss.adversarial.enabled is not supported (two optimisers share one "
            "loss scaler); use bf16 or no"
        )
    _validate_diffusability(cfg)
    if cfg.probe.time_shift is not None and cfg.probe.time_shift <= 0:
        raise ConfigError(f"probe.time_shift: must be > 0 (1: no shift), got {cfg.probe.time_shift}")
    if cfg.probe.hidden % cfg.probe.heads:
        raise ConfigError(f"probe.heads: {cfg.probe.heads} does not divide probe.hidden ({cfg.probe.hidden})")
    return cfg


def _validate_diffusability(cfg: Config) -> None:
    """loss.equivariance: its lists, and images the loss networks can take."""
    eq, loss = cfg.loss.equivariance, cfg.loss
    a, b = (eq.scale_range + [0, 0])[:2]
    if len(eq.scale_range) != 2 or not 1 <= a <= b:
        raise ConfigError(f"loss.equivariance.scale_range: expected [a, b] with 1 <= a <= b, got {eq.scale_range}")
    if any(r not in (0, 1, 2, 3) for r in eq.rotations):
        raise ConfigError(f"loss.equivariance.rotations: quarter turns 0..3, got {eq.rotations}")
    if not eq.scale_factors or any(k < 2 for k in eq.scale_factors):
        raise ConfigError(f"loss.equivariance.scale_factors: integers >= 2, got {eq.scale_factors}")
    if eq.enabled:
        f = cfg.model.downsampling_factor
        side = cfg.data.resolution // f
        smallest = f * max(1, side * a // eq.scale_denominator if eq.mode == "eq-vae"
                           else side // max(eq.scale_factors))
        need = max(16 if loss.perceptual.weight > 0 else 1,
                   3 * 2 ** loss.adversarial.disc_layers if loss.adversarial.enabled else 1)
        if smallest < need:
            raise ConfigError(f"loss.equivariance: its smallest transformed image is {smallest} px at data.resolution "
                              f"{cfg.data.resolution}, below the {need} px LPIPS / the PatchGAN need; raise "
                              f"loss.equivariance.scale_range[0] (or lower scale_factors) or the resolution")


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A preset name (`kl-f8`) or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        return p
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    presets = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
    close = difflib.get_close_matches(str(name_or_path), presets, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise ConfigError(f"no config file or preset named {name_or_path!r} (presets: {', '.join(presets)}){hint}")


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    if path.resolve() in seen:
        raise ConfigError(f"{path}: `base` chain loops back to itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    base = data.pop("base", None)
    if base is None:
        return data
    parent = resolve_config_path(base) if not (path.parent / str(base)).is_file() else path.parent / str(base)
    return merge_dicts(_read_yaml(parent, seen + (path.resolve(),)), data)


def merge_dicts(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """`a.b.c=value` strings into a nested dict; values parsed as YAML scalars (`true`, `1e-6`, `[1,2]`)."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.max_steps=100)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part}")
        node[leaf] = value
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a preset or YAML file, apply dotted overrides, validate. Raises ConfigError with one line."""
    data = _read_yaml(resolve_config_path(path)) if path else {}
    data = merge_dicts(data, parse_overrides(overrides or []))
    return validate(_build(Config, data))


def validate_section(obj, prefix: str) -> None:
    """Check one section instance (built in code, not from YAML) against the schema: types, choices, ranges."""
    _check_ranges(_build(type(obj), dataclasses.asdict(obj), prefix), prefix)


def config_from_dict(data: dict) -> Config:
    return validate(_build(Config, data))


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config (every key, defaults included) so a run is reproducible from its folder."""
    from pipeline.storage import as_path, atomic_write_text

    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def describe_fields(cls=Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every leaf key, for `--help` listings and docs."""
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(default):
            rows += describe_fields(type(default), prefix + f.name + ".")
        else:
            rows.append((prefix + f.name, repr(default), f.metadata.get("help", "")))
    return rows
