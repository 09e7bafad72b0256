"""The worker side of training: what runs inside each Ray Train worker.

- ``loop``: the training loop (run, step, micro-batch), also runnable in one plain process.
- ``engines``: DeepSpeed and torch DDP behind one interface; weights exported as a Hugging Face folder.
- ``state``: the one object that saves and resumes a run (engine, batch source, generators); metrics.
- ``sampler_client``: the online sampler (a vLLM or transformers pool per worker) for DCOa and Dr. GRPO.
- ``evaluation``: the per-epoch evaluation of the live weights.

What a step trains is decided in ``passn.batches``; the entry point is ``jobs/train.py``.
"""
