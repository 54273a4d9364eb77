"""What train.py needs besides the model and the data: config checks, distributed setup, the
optimizer and schedule, EMA, checkpoints, W&B logging and RoI drawings."""
