"""Graph passes, one per file, each a function over a ``torch.fx.GraphModule``.

In the order :func:`localize.transform` runs them: ``annotate_tensors`` → ``annotate_costs`` →
``find_cut_points`` → ``balance_blocks`` (or ``resolve_named_cuts``) → ``assign_blocks`` →
``bind_training_mode`` (exported graphs) → ``insert_gradient_cuts`` → ``verify_isolation`` →
``insert_aux_heads``. Facts about nodes live in ``node.meta["localize"]``.
"""
