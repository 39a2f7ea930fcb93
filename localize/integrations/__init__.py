"""Trainers people already use, driving a :class:`~localize.LocalModel`'s local steps.

* :mod:`localize.integrations.lightning`: ``LocalizeModule(lm)``, a ``lightning.LightningModule``
  (extra ``[lightning]``);
* :mod:`localize.integrations.hf`: ``LocalTrainer``, a ``transformers.Trainer`` (extra ``[hf]``).

Each imports its library on import and says which extra brings it when it is missing.
"""
