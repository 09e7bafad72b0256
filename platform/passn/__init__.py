"""passn: fine-tune language models for pass@N.

The pure library: importable without Ray, vLLM or DeepSpeed. Modules:

- ``passn.objectives``: coverage weight F(N, p), CE, DCO, DCOstep, DCOa, Dr. GRPO (torch).
- ``passn.coverage``: unbiased pass@k, exact coverage, confidence summaries, Pareto frontier (numpy).
- ``passn.verify``: answer extraction and bounded, cached answer checking.
- ``passn.tasks``: MATH-format data and the built-in synthetic task.
- ``passn.config``: the validated run configuration.
"""

__version__ = "0.1.0"

from passn.storage import configure_s3_retries as _configure_s3_retries

_configure_s3_retries()  # every s3:// path retries throttling (passn.storage)
