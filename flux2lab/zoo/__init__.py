"""flux2lab's own small trained model and the ground truth to score it against.

- `world`: the synthetic world (scenes of shapes, their captions, their images; seeded, unlimited).
- `mini`: FLUX.2's diffusers classes at small size, trained on the world (`load_pipeline("mini")`).
- `yardstick`: a classifier that reads scenes back from images: attribute accuracy and domain FID, the
  metric "yardstick" of `flux2lab.metrics` (registered when `flux2lab.zoo.yardstick` is imported).
- `train`: `python -m flux2lab.zoo.train` makes all weights (`store` reads and writes them).
- `evaluate`: `python -m flux2lab.zoo.evaluate` scores a model and recipe on held-out captions.
"""
