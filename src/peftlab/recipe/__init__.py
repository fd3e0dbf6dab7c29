"""The training recipe: what `peftlab train` does with a run config, built on the library.

    config       the run config: YAML + command-line overrides, validated into dataclasses
                 (the dataclasses hold every default; the default job is generated from them)
    data         the task registry (@register_task), tasks' rows, splits, tokenisation
    models       the packaged base models, loaded as `transformers` models
    adaptation   how a loaded model becomes trainable (peftlab's attach, or a baseline)
    peer         the same method through the `peft` library, for the bench's side-by-side column
    rundir       the run directory: its name, how a run starts there (--resume, --overwrite), its records
    checkpoint   what a checkpoint holds besides the Trainer's own files (RNG, step, hashes)
    metrics      accuracy and macro F1, and a trained model's score on rows of a task
    loop         transformers' Trainer with peftlab's loss, step hook and checkpoints
    trainer      train(run): the run's steps, top to bottom
    runs         a finished run directory: evaluate, merge, export

Imports point one way: trainer -> loop -> (rundir, adaptation, data, config); runs -> (rundir,
metrics, data); nothing here imports trainer or runs.

The library (core, registry, hosts, targets, io, methods, optim) never imports this package;
tests/test_layout.py checks that direction.
"""
