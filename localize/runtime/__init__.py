"""The runtime: ``LocalModel`` runs the generated training step (``model``), whose runtime ops live
in ``ops``; the default loss, the fused optimizers, checkpoints, schedules and the memory meter."""
