"""The library: everything a run needs, grouped by concern. It never imports eval/,
launch/, data_prep/ or bench/ (the applications built on it), and no module imports one
above it (tests/test_layout.py holds the floors):

    redact, ranks, tokenizer, cli   shared leaves
    model/                          the model family (SharedCLIP: MS-CLIP, CLIP, FLIP's token dropping)
    config, pixels                  the run config; pixels normalized on the device
    losses/                         the objectives' losses, pure functions
    data/                           shards and streams: decode, augment, tokenize, positions
    objectives                      the objective terms composed into one, and what a batch carries for them
    weights/                        checkpoints, the export evaluation reads, the field's weights in and out
    tracking/                       the store rule, the metrics logger, the replay into MLflow, the MLflow Model
    train/                          preflight, the DeepSpeed config and engine, lifecycle, the trainer
"""
