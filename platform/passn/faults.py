"""The environment variables that inject real faults into passn's processes (tests and the fault
suite, RELIABILITY.md). jobs.cluster passes them through to every Ray worker; each is read where
its fault happens."""

# "RANK:STEP": that training worker's process exits at that step (trainer.loop)
KILL_RANK_ENV = "PASSN_FAULT_KILL_RANK_AT_STEP"
# "PATH" or "PATH:V": the first request (to an actor holding policy version >= V) that finds the
# marker file PATH absent creates it and kills its sampler actor (actors.sampler)
SAMPLER_DIE_ENV = "PASSN_FAULT_SAMPLER_DIE_ONCE"
# a marker path: the first sampling request that finds it absent hangs
SAMPLER_HANG_ENV = "PASSN_FAULT_SAMPLER_HANG_ONCE"
# a marker path: the first sampling request that finds it absent runs out of memory for real (its
# process's address space capped just above what it holds, then a 1 GiB allocation)
SAMPLER_OOM_ENV = "PASSN_FAULT_SAMPLER_OOM_ONCE"
# seconds a sampler actor restarted after SAMPLER_DIE_ENV's death takes to come back (a busy machine)
SAMPLER_SLOW_RESTART_ENV = "PASSN_FAULT_SAMPLER_SLOW_RESTART_S"

ALL = (KILL_RANK_ENV, SAMPLER_DIE_ENV, SAMPLER_HANG_ENV, SAMPLER_OOM_ENV, SAMPLER_SLOW_RESTART_ENV)
