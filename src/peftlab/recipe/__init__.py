"""The training recipe: what `peftlab train` does with a run config, built on the library.

    config       the run config: YAML + command-line overrides, validated into dataclasses
    data         tasks and their rows (the packaged datasets), splits, tokenisation
    models       the packaged base models, loaded as `transformers` models
    adaptation   how a loaded model becomes trainable (peftlab's attach, or a baseline)
    peer         the same method through the `peft` library, for the bench's side-by-side column
    checkpoint   what a checkpoint holds besides the Trainer's own files (RNG, step, hashes)
    trainer      train(run): the run's steps, top to bottom
    runs         a finished run directory: evaluate, merge, export

The library (core, registry, hosts, targets, io, methods, optim) never imports this package;
tests/test_layout.py checks that direction.
"""
