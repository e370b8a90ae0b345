"""Training helpers the train stage composes: EMA, learning-rate schedules, the model wrapper, image grids."""
