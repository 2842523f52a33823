"""The resumable, tracked-job skeleton shared by ``moco_pretrain`` and ``semisup``.

A resumable job trains step by step beside a checkpoint file and logs to one MLflow run:

- ``fewshot.jobs.loop`` (no MLflow; the training loops use it): ``CheckpointWriter`` writes the
  loop's state atomically with its format, version and config; ``StepBoundary`` says when a
  checkpoint is due (every few minutes, or a signal asked to stop) and stops the loop at a step
  boundary on Ctrl-C / SIGTERM.
- ``fewshot.jobs.tracked`` (MLflow): ``JobStart`` resolves ``--resume`` to a checkpoint file and
  the state it continues; ``TrackedJob`` checks that the checkpoint's run is in this store, opens the
  run or reopens it, logs the params of a fresh run or the history a kill left unlogged, logs every
  new history entry once, and at the end logs the checkpoint and the model and registers it.

A new resumable job keeps its config and loop in its own package and writes a ``job`` module
that fills these in (``fewshot/pretrain/job.py`` and ``fewshot/semisup/job.py`` are the examples).
"""
