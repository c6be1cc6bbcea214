"""Training: the checks before launch (preflight.py, plain Python: a `Plan`), the DeepSpeed
JSON filled from the run config (ds_config.py), the engine and the step (engine.py), how a
rank stops and watches its peers (lifecycle.py), and the trainer that runs the loop
(trainer.py). launch/train.py is the entry point."""
