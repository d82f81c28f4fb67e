"""Scaled-out runs: trainer ranks (FSDP2 over ``torch.distributed``) and rollout engines placed by Ray.

``--use-ray`` (implied by a layout of more than one process) places ``--actor-num-nodes x
--actor-num-gpus-per-node`` trainer ranks and the rollout engines (``--rollout-num-gpus`` /
``--rollout-num-gpus-per-engine``, or ``--colocate`` on the trainer's devices) as Ray actors. On CPU the
same flags count processes. Needs the ``ray`` extra: ``pip install 'miles-core[ray]'``.
"""
