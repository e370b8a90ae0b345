"""The generation probe: a small diffusion transformer trained on latent shards, the measurement of how well a first
stage's latents diffuse (firststage probe; docs/diffusable-latents.md).

  flow.py      the rectified-flow objective (SiT / LightningDiT), t sampling, RAE's time shift, the validation grid,
               the transformer (diffusers' DiTTransformer2DModel) and the sampler (FlowMatchEulerDiscreteScheduler)
  trainer.py   ProbeTrainer: the train stage's conventions (accelerate, EMA, checkpoints, resume, SIGTERM)
  report.py    probe.json, probe.md, the decoded sample grid, FID
"""
