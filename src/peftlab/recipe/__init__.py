"""The training recipe: what `peftlab train` does with a run config, built on the library.

    config       the run config: YAML + command-line overrides, validated into dataclasses
                 (the dataclasses hold every default; the default job is generated from them)
    data         the task registry (@register_task), tasks' rows, splits, tokenisation
    models       the packaged base models, loaded as `transformers` models
    adaptation   how a loaded model becomes trainable (peftlab's attach, or a baseline)
    peer         the same method through the `peft` library, for the bench's side-by-side column
    rundir       the run directory: its name, how a run starts there (--resume, --overwrite), its records
    checkpoint   checkpoints in safetensors + JSON (trainable tensors, optimizer, scheduler, RNG,
                 progress), written atomically
    metrics      accuracy and macro F1, and a trained model's score on rows of a task
    loop         transformers' Trainer with peftlab's loss, step hook and checkpoints
    trainer      train(run): the run's steps, top to bottom
    runs         a finished run directory: evaluate, merge, export

Imports point one way: trainer -> loop -> (rundir, adaptation, data, config, metrics); runs ->
(rundir, metrics, data, models, adaptation); nothing here imports trainer or runs.

The library (core, registry, hosts, targets, io, methods, optim) never imports this package;
tests/test_layout.py checks that direction.
"""
