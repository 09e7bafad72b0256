"""The worker side of training: what runs inside each Ray Train worker.

- ``loop``: the training loop (run, step, micro-batch), also runnable in one plain process.
- ``engines``: DeepSpeed and torch DDP behind one interface; weights exported as a Hugging Face folder.
- ``state``: the one object that saves and resumes a run (engine, batch source, generators); metrics.
- ``policy_pool``: a worker's sampler pool (vLLM or transformers) holding its current weights.
- ``sampler_client``: the online sampler for DCOa and Dr. GRPO (draws from the policy pool).
- ``evaluation``: the per-epoch evaluation of the live weights.

What a step trains is decided in ``passn.batches``; the entry point is ``jobs/train.py``.
"""
