"""The training app: the LightningModule, checkpointing, callbacks and loggers that `train(cfg)` puts together."""
