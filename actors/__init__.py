"""Ray actors: sampler, verifier and prover pools (thin wrappers over engines)."""
